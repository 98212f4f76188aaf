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
   the end of each worker (torch >= 2.14 aborts a worker that exits with a live group). When a
   worker raises, it ends the whole job within seconds with that worker's error
   (:class:`DistributedWorkerError`) instead of hanging in a barrier.
"""
import importlib
import logging
import os
import sys
import types
from datetime import timedelta

__all__ = [
    "apply_all",
    "patch_pillow",
    "patch_missing_detectron2_C",
    "launch",
    "MissingCompiledOp",
    "DistributedWorkerError",
]

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
            "(see docs/getting_started.md, 'detectron2')."
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


class DistributedWorkerError(RuntimeError):
    """A worker process of :func:`launch` failed; the others were stopped.

    Attributes: ``rank`` (global rank of the first worker that failed), ``exitcode``, ``worker_traceback``
    (its Python traceback, or None when it died without one, e.g. killed by a signal).
    """

    def __init__(self, rank, exitcode, worker_traceback, world_size):
        self.rank, self.exitcode, self.worker_traceback, self.world_size = rank, exitcode, worker_traceback, world_size
        if worker_traceback:
            detail = f"rank {rank} of {world_size} raised:\n{worker_traceback.rstrip()}"
        else:
            how = f"signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
            detail = f"rank {rank} of {world_size} died with {how} without a Python error (killed? out of memory?)"
        super().__init__(f"distributed job failed; the other workers were stopped. {detail}")


# How long the launcher waits, after a worker failed, for the others to exit by themselves before
# SIGTERM, and after SIGTERM before SIGKILL. A worker blocked in a collective waiting for the failed
# one cannot finish by itself, so these bound the time from a failure to the launcher's exit.
FAILURE_GRACE_SECONDS = 2.0
TERMINATE_GRACE_SECONDS = 5.0


def _report_worker_failure(report_dir, global_rank):
    """In a failing worker: log the error (rank log file, stderr) and leave it for the launcher."""
    import json
    import time
    import traceback

    tb = traceback.format_exc()
    logging.getLogger("detectron2").error(f"rank {global_rank} failed:\n{tb}")
    if report_dir:
        path = os.path.join(report_dir, f"rank{global_rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"rank": global_rank, "time": time.time(), "traceback": tb}, f)
        os.replace(path + ".tmp", path)
    for handler in logging.getLogger("detectron2").handlers + logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.flush()


def _distributed_worker(
    local_rank,
    main_func,
    world_size,
    num_workers_per_machine,
    machine_rank,
    dist_url,
    args,
    timeout,
    backend,
    report_dir=None,
):
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    global_rank = machine_rank * num_workers_per_machine + local_rank
    try:
        dist.init_process_group(
            backend=backend, init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
        )
        _setup_local_process_group(num_workers_per_machine, machine_rank, world_size)
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        comm.synchronize()
        main_func(*args)
    except SystemExit as e:
        if e.code not in (None, 0):
            _report_worker_failure(report_dir, global_rank)
            os._exit(1)
    except BaseException:
        # Never wait for the other ranks here: they may be blocked in a collective that needs this
        # one (that was the hang: a barrier in `finally`). Report and leave at once; the launcher
        # stops the others. os._exit skips the process-group teardown that would block or abort.
        _report_worker_failure(report_dir, global_rank)
        os._exit(1)
    # torch >= 2.14 aborts ("terminate called without an active exception") when a worker
    # returns with a live process group; leave together, then tear the group down.
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _read_failure_reports(report_dir):
    import glob
    import json

    reports = []
    for path in glob.glob(os.path.join(report_dir, "rank*.json")):
        try:
            with open(path) as f:
                reports.append(json.load(f))
        except (OSError, ValueError):
            pass
    return sorted(reports, key=lambda r: r["time"])


def _join_workers(processes, report_dir, machine_rank, num_workers_per_machine, world_size):
    """Wait for every worker; on the first failure stop the others and raise DistributedWorkerError."""
    import multiprocessing.connection
    import time

    alive = {p.sentinel: i for i, p in enumerate(processes)}
    first_failed = None
    while alive and first_failed is None:
        for sentinel in multiprocessing.connection.wait(list(alive)):
            i = alive.pop(sentinel)
            processes[i].join()
            if processes[i].exitcode != 0 and first_failed is None:
                first_failed = i
    if first_failed is None:
        return
    deadline = time.monotonic() + FAILURE_GRACE_SECONDS
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE_SECONDS
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
        p.join()
    # The root cause is the earliest Python error (a peer that lost its connection reports later);
    # a worker killed by a signal leaves no report and is named by its exit code.
    reports = _read_failure_reports(report_dir)
    first_rank = machine_rank * num_workers_per_machine + first_failed
    first_exitcode = processes[first_failed].exitcode
    if reports and (first_exitcode > 0 or any(r["rank"] == first_rank for r in reports)):
        r = reports[0]
        local = r["rank"] - machine_rank * num_workers_per_machine
        raise DistributedWorkerError(r["rank"], processes[local].exitcode, r["traceback"], world_size)
    raise DistributedWorkerError(first_rank, first_exitcode, None, world_size)


def launch(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
):
    """Drop-in for ``detectron2.engine.launch`` that also works without a GPU, and never hangs on a failure.

    ``num_gpus_per_machine`` is the number of worker processes per machine: GPUs when CUDA is
    present (NCCL), CPU processes otherwise (gloo). ``dist_url="auto"`` picks a free local port.

    When a worker raises, it logs the traceback (its ``log.txt.rankN`` and stderr) and exits at
    once; the launcher then gives the other local workers ``FAILURE_GRACE_SECONDS`` to exit,
    SIGTERMs them, SIGKILLs them after ``TERMINATE_GRACE_SECONDS`` more, and raises
    :class:`DistributedWorkerError` carrying the failing rank's traceback (the earliest error:
    ranks that lost their peer fail later). On one machine the job therefore ends within about
    ``FAILURE_GRACE_SECONDS + TERMINATE_GRACE_SECONDS`` (7 s) of the error. Workers on *other*
    machines notice when their collective fails: at once with gloo (the peer's sockets close),
    within ``timeout`` with NCCL.
    """
    import shutil
    import tempfile

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
    report_dir = tempfile.mkdtemp(prefix="cpm_d2_launch_")
    try:
        context = mp.start_processes(
            _distributed_worker,
            nprocs=num_gpus_per_machine,
            args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout, backend, report_dir),
            daemon=False,
            join=False,
            start_method="spawn",
        )
        _join_workers(context.processes, report_dir, machine_rank, num_gpus_per_machine, world_size)
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)
