"""The one place that knows about old detectron2 (0.6 from the registry) and new Pillow.

cpm_d2 runs on two detectron2 builds that behave differently:

* detectron2 0.6 as published on the registry (``pb1-detectron2``), built *without* its C++ ops;
* current detectron2 from its Git repository.

This module makes both look the same to the rest of the package. Each fix is applied only when
the installed library needs it (feature detection, never version strings), and applying them
twice is a no-op. ``cpm_d2/__init__.py`` calls :func:`apply_all` before importing anything
else from detectron2.

Fixes:

1. ``PIL.Image.LINEAR`` was removed in Pillow 10 (it was an alias of ``BILINEAR``); detectron2
   0.6 uses it as a default argument in ``detectron2/data/transforms/transform.py``.
2. ``detectron2._C`` (compiled ops) is missing when detectron2 was built without extensions;
   detectron2 0.6 imports it at module top in ``layers/deform_conv.py``, ``rotated_boxes.py``
   and ``roi_align_rotated.py``. We register a stand-in module whose attributes raise a clear
   error naming the op, so importing works and only *calling* such an op fails.
3. ``detectron2.engine.launch`` in 0.6 asserts CUDA and hard-codes NCCL. :func:`launch` runs
   CPU-only multi-process jobs on gloo and, on every detectron2, destroys the process group at
   the end of each worker (torch >= 2.14 aborts a worker that exits with a live group).
"""
import importlib
import logging
import sys
import types
from datetime import timedelta

__all__ = ["apply_all", "patch_pillow", "patch_missing_detectron2_C", "launch", "MissingCompiledOp"]

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT = timedelta(minutes=30)


class MissingCompiledOp(RuntimeError):
    """Raised when code calls a detectron2 C++/CUDA op that this build does not have."""


def patch_pillow(image_module=None):
    """Give Pillow >= 10 back the ``Image.LINEAR`` alias. Returns True if it patched."""
    if image_module is None:
        from PIL import Image as image_module
    if hasattr(image_module, "LINEAR"):
        return False
    image_module.LINEAR = image_module.BILINEAR
    return True


class _MissingCModule(types.ModuleType):
    """Stand-in for ``detectron2._C``: importable, but every op raises :class:`MissingCompiledOp`.

    The version queries ``detectron2.utils.collect_env`` makes (logged by ``default_setup``)
    answer "not built" instead of raising.
    """

    _is_cpm_d2_stub = True

    @staticmethod
    def get_compiler_version():
        return "not built (detectron2 installed without C++ ops; cpm_d2.compat stand-in)"

    @staticmethod
    def get_cuda_version():
        return "not built"

    @staticmethod
    def has_cuda():
        return False

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingCompiledOp(
            f"detectron2._C.{name} is a compiled detectron2 op, but this detectron2 was built "
            "without its C++/CUDA extensions (e.g. the registry's pb1-detectron2 sdist). cpm_d2 "
            "does not use it; if your code needs it, install detectron2 from its Git repository "
            "(see README: 'Installing official detectron2')."
        )


def _compiled_ops_importable(package):
    try:
        importlib.import_module(package.__name__ + "._C")
        return True
    except ImportError:
        return False


def patch_missing_detectron2_C(detectron2_module=None):
    """Register a stand-in ``detectron2._C`` if the real one cannot be imported.

    Args:
        detectron2_module: the ``detectron2`` package (a fake module object in tests).
    Returns:
        True if the stand-in was installed, False if nothing was needed.
    """
    if detectron2_module is None:
        import detectron2 as detectron2_module
    name = detectron2_module.__name__ + "._C"
    existing = sys.modules.get(name)
    if existing is not None:
        return False  # real module already imported, or our stand-in from an earlier call
    if _compiled_ops_importable(detectron2_module):
        return False
    stub = _MissingCModule(name)
    sys.modules[name] = stub
    setattr(detectron2_module, "_C", stub)
    return True


_APPLIED = False


def apply_all():
    """Apply every fix this environment needs (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    # detectron2 and fvcore decorate helpers with torch.jit.script at import time; torch >= 2.10
    # warns on each. The warning is about those libraries, not about anything a user can act on.
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    patch_pillow()
    patch_missing_detectron2_C()
    _APPLIED = True


# --------------------------------------------------------------------------------------------
# Multi-process launch
# --------------------------------------------------------------------------------------------
def _find_free_port():
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _setup_local_process_group(num_workers_per_machine, machine_rank, world_size):
    """Create the per-machine process group detectron2's ``comm.get_local_rank`` uses."""
    from detectron2.utils import comm

    if hasattr(comm, "create_local_process_group"):  # current detectron2
        comm.create_local_process_group(num_workers_per_machine)
        return
    num_machines = world_size // num_workers_per_machine  # detectron2 0.6
    import torch.distributed as dist

    for i in range(num_machines):
        ranks = list(range(i * num_workers_per_machine, (i + 1) * num_workers_per_machine))
        group = dist.new_group(ranks)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def _distributed_worker(
    local_rank, main_func, world_size, num_workers_per_machine, machine_rank, dist_url, args, timeout, backend
):
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    global_rank = machine_rank * num_workers_per_machine + local_rank
    dist.init_process_group(
        backend=backend, init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
    )
    _setup_local_process_group(num_workers_per_machine, machine_rank, world_size)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        # torch >= 2.14 aborts ("terminate called without an active exception") when a worker
        # returns with a live process group; leave together, then tear the group down.
        if dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()


def launch(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
):
    """Drop-in for ``detectron2.engine.launch`` that also works without a GPU.

    ``num_gpus_per_machine`` is the number of worker processes per machine: GPUs when CUDA is
    present (NCCL), CPU processes otherwise (gloo). ``dist_url="auto"`` picks a free local port.
    """
    import torch
    import torch.multiprocessing as mp

    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    use_cuda = torch.cuda.is_available()
    if use_cuda and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"--num-gpus {num_gpus_per_machine} but only {torch.cuda.device_count()} GPU(s) are visible"
        )
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' only works on one machine; pass --dist-url tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    backend = "nccl" if use_cuda else "gloo"
    mp.spawn(
        _distributed_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout, backend),
        daemon=False,
    )
