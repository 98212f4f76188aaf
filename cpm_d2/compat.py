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
3. ``detectron2.engine.launch`` in 0.6 asserts CUDA and hard-codes NCCL, and 0.6 has no
   ``create_local_process_group``. :func:`launch` starts the workers with torch's elastic agent
   (what ``torchrun`` runs) on NCCL or, without CUDA, gloo; :func:`run_rank` is the body of every
   rank however it was started (``launch``, ``torchrun``, SLURM): it joins the group from the
   environment (``env://``), sets detectron2's per-machine group, and destroys the group at the
   end (torch >= 2.14 aborts a worker that exits with a live group). When a worker raises, the
   job ends within seconds with that worker's traceback (:class:`DistributedWorkerError`) instead
   of hanging in a barrier.
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
    "run_rank",
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


# After a worker failed, the elastic agent SIGTERMs the others and SIGKILLs them after this many
# seconds: a worker blocked in a collective waiting for the failed one cannot finish by itself.
TERMINATE_GRACE_SECONDS = 5


def _find_free_port():
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _set_local_process_group(node):
    """Give detectron2's ``comm.get_local_rank`` / ``get_local_size`` the group of the ranks on this
    machine (``node``: any value the ranks of one machine share). Collective: every rank calls it.

    detectron2 0.6 has no ``create_local_process_group``; current detectron2 assumes the same number of
    processes per machine. Grouping by ``node`` works on both and for any launcher.
    """
    import torch.distributed as dist
    from detectron2.utils import comm

    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    for value in sorted(set(nodes), key=str):
        group = dist.new_group([r for r, n in enumerate(nodes) if n == value])
        if value == node:
            comm._LOCAL_PROCESS_GROUP = group


def _log_error_to_files(message):
    """Write ``message`` to the log files of detectron2's logger (this rank's log.txt / log.txt.rankN), not the console."""
    import sys as _sys

    log = logging.getLogger("detectron2")
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in log.handlers:
        if getattr(handler, "stream", None) not in (_sys.stdout, _sys.stderr):
            try:
                handler.handle(record)
                handler.flush()
            except Exception:
                pass


def _leave_after_error(rank, exitcode=1):
    """In an ``except`` block of a rank: report the error and end this process at once.

    The traceback goes to this rank's log files, to stderr and, when torch's elastic agent (``launch``,
    ``torchrun``) started the process, to its error file (``TORCHELASTIC_ERROR_FILE``), which the agent
    reports. The process never waits for the other ranks: they may be blocked in a collective that needs
    this one. ``os._exit`` skips the process-group teardown that would block or abort.
    """
    import traceback

    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    tb = traceback.format_exc()
    _log_error_to_files(f"rank {rank} failed:\n{tb}")
    sys.stderr.write(tb)
    ErrorHandler().record_exception(sys.exc_info()[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exitcode)


def run_rank(main_func, args=(), timeout=DEFAULT_TIMEOUT):
    """Run ``main_func(*args)`` as one rank of a multi-process job; returns what it returns.

    The environment describes the rank, as torch's launchers set it: ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (``GROUP_RANK``: the machine's index, else the
    host name groups the ranks of a machine). The process joins the job's group with
    ``init_process_group("env://")`` (NCCL with CUDA, gloo on the CPU), runs ``main_func``, and leaves
    with the others (torch >= 2.14 aborts a process that exits with a live group).

    When ``main_func`` raises, the traceback is reported (:func:`_leave_after_error`) and the process
    exits with status 1 at once; ``SystemExit(n)`` exits with status ``n`` without a traceback.
    """
    import socket

    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        if backend == "nccl":  # a task bound to one GPU (SLURM --gpus-per-task 1) sees it as device 0
            visible = torch.cuda.device_count()
            if local_rank >= visible and visible != 1:
                raise ValueError(f"LOCAL_RANK {local_rank}, but this process sees {visible} GPU(s): start one "
                                 "process per GPU (torchrun --nproc_per_node, srun --ntasks-per-node = GPUs per node)")
            torch.cuda.set_device(local_rank if local_rank < visible else 0)
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        _set_local_process_group(os.environ.get("GROUP_RANK") or socket.gethostname())
        comm.synchronize()
        result = main_func(*args)
    except SystemExit as e:
        if e.code in (None, 0):
            result = None
        elif isinstance(e.code, int):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code)
        else:
            _leave_after_error(rank)
    except BaseException:
        _leave_after_error(rank)
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    return result


def _rendezvous_address(dist_url, num_machines):
    """``tcp://HOST:PORT`` or ``"auto"`` (a free local port, one machine only) -> (host, port)."""
    from urllib.parse import urlparse

    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' only works on one machine; pass --dist-url tcp://HOST:PORT")
        return "127.0.0.1", _find_free_port()
    url = urlparse(dist_url)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"--dist-url {dist_url!r}: expected tcp://HOST:PORT (machine 0's address) or 'auto'")
    return url.hostname, url.port


def _first_worker_error(failure, log_dir, machine_rank, num_workers, world_size):
    """:class:`DistributedWorkerError` of the earliest error file the workers wrote under ``log_dir``.

    A peer that lost its connection to the failed worker fails later, so the earliest Python error is
    the root cause; a worker killed by a signal leaves no error file and is named by its exit code.
    """
    import glob
    import json

    rank, first = failure.get_first_failure()
    if first.exitcode < 0 and not os.path.isfile(first.error_file):
        return DistributedWorkerError(rank, first.exitcode, None, world_size)
    files = sorted(glob.glob(os.path.join(log_dir, "**", "error.json"), recursive=True),
                   key=lambda p: os.stat(p).st_mtime_ns)
    for path in files:
        try:
            with open(path) as f:
                message = json.load(f)["message"]
            worker_traceback = message["extraInfo"]["py_callstack"]
            local_rank = int(os.path.basename(os.path.dirname(path)))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        rank = machine_rank * num_workers + local_rank
        exitcode = failure.failures[rank].exitcode if rank in failure.failures else 1
        return DistributedWorkerError(rank, exitcode, worker_traceback, world_size)
    return DistributedWorkerError(rank, first.exitcode, None, world_size)


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
    present (NCCL), CPU processes otherwise (gloo). ``dist_url``: ``tcp://HOST:PORT`` of machine 0,
    or ``"auto"`` (a free local port, one machine). A world of one process runs ``main_func`` here.

    The workers are started by torch's elastic agent (``torch.distributed.launcher``, what ``torchrun``
    runs; static rendezvous at ``dist_url``, no restarts) and each runs :func:`run_rank`. When a worker
    raises, it reports its traceback and exits at once; the agent stops the other local workers
    (SIGTERM, SIGKILL after ``TERMINATE_GRACE_SECONDS``) and this raises :class:`DistributedWorkerError`
    with the first failing rank's traceback. Workers on *other* machines notice when their collective
    fails: at once with gloo (the peer's sockets close), within ``timeout`` with NCCL.
    """
    import shutil
    import tempfile

    import torch
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        return main_func(*args)
    if torch.cuda.is_available() and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"--num-gpus {num_gpus_per_machine} but only {torch.cuda.device_count()} GPU(s) are visible"
        )
    host, port = _rendezvous_address(dist_url, num_machines)
    log_dir = tempfile.mkdtemp(prefix="cpm_d2_launch_")
    config = LaunchConfig(
        min_nodes=num_machines,
        max_nodes=num_machines,
        nproc_per_node=num_gpus_per_machine,
        run_id=f"cpm_d2_{host}_{port}",
        rdzv_backend="static",
        rdzv_endpoint=f"{host}:{port}",
        rdzv_configs={"rank": machine_rank},
        max_restarts=0,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
        shutdown_timeout=TERMINATE_GRACE_SECONDS,
    )
    try:
        results = elastic_launch(config, run_rank)(main_func, args, timeout)
    except ChildFailedError as e:
        raise _first_worker_error(e, log_dir, machine_rank, num_gpus_per_machine, world_size) from None
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    return results.get(machine_rank * num_gpus_per_machine)
