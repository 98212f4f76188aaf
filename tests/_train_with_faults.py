"""``tools/train_net.py`` with test-only fault injection, driven by environment variables.

Used by tests/engine/test_reliability.py as ``python tests/_train_with_faults.py <train_net arguments>``.
The patches are applied at import time, so they also act in the worker processes that
``--num-gpus N`` spawns (multiprocessing re-imports this file there as ``__mp_main__``).

* ``CPM_TEST_LOSS_LOG=path``: the main process appends one JSON line per iteration with the raw
  (unsmoothed, rank-averaged) loss terms, and ``{"start_iter": k}`` when training starts.
* ``CPM_TEST_FAIL=R:I``: rank ``R`` raises ``RuntimeError`` before iteration ``I``.
* ``CPM_TEST_EXIT_AFTER=I``: every rank leaves with ``os._exit(17)`` after iteration ``I``
  (no cleanup: like a crash).
* ``CPM_TEST_KILL_IN_SAVE=N:STAGE``: the process SIGKILLs itself inside its ``N``-th checkpoint
  save (1-based, counting ``.pth`` files), at ``STAGE``: ``write`` (half the bytes written),
  ``before_rename`` / ``after_rename`` (of the ``.pth``), ``tag_before_rename`` /
  ``tag_after_rename`` (of ``last_checkpoint``).
* ``CPM_TEST_SAVE_ERROR=N:CODE``: the ``N``-th checkpoint save (1-based, ``.pth`` files) fails with
  the OS error ``CODE``: ``ENOSPC`` writes its temporary file to ``/dev/full`` (a real disk-full
  error inside ``torch.save``), others (``EROFS``, ``EACCES``) fail creating it.
"""
import errno
import io
import json
import os
import signal
import sys
import time

from _scripts import load_script  # found in tests/, the folder of this script

train_net = load_script("tools/train_net.py")  # imports cpm_d2 first: compat fixes
import torch  # noqa: E402
from detectron2.engine import HookBase  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from cpm_d2.engine import Trainer  # noqa: E402


def _die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _RecordLosses(HookBase):
    def __init__(self, path):
        self.path = path

    def _write(self, record):
        if comm.is_main_process():
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def before_train(self):
        self._write({"start_iter": self.trainer.start_iter, "pid": os.getpid()})

    def after_step(self):
        latest = self.trainer.storage.latest()
        losses = {k: float(v[0]) for k, v in latest.items() if k.startswith("loss") or k == "total_loss"}
        self._write({"iter": self.trainer.iter, "losses": losses})


class _Fail(HookBase):
    def __init__(self, rank, iteration):
        self.rank, self.iteration = rank, iteration

    def before_step(self):
        if comm.get_rank() == self.rank and self.trainer.iter == self.iteration:
            raise RuntimeError(
                f"injected failure on rank {self.rank} at iteration {self.iteration} (t={time.time():.3f})"
            )


class _ExitAfter(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(17)


_build_hooks = Trainer.build_hooks


def _build_hooks_with_faults(self):
    hooks = _build_hooks(self)
    if os.environ.get("CPM_TEST_FAIL"):
        rank, it = (int(x) for x in os.environ["CPM_TEST_FAIL"].split(":"))
        hooks.insert(0, _Fail(rank, it))
    if os.environ.get("CPM_TEST_LOSS_LOG"):  # first: a line is written before any checkpoint of its iteration
        hooks.insert(0, _RecordLosses(os.environ["CPM_TEST_LOSS_LOG"]))
    if os.environ.get("CPM_TEST_EXIT_AFTER"):
        hooks.append(_ExitAfter(int(os.environ["CPM_TEST_EXIT_AFTER"])))
    return hooks


Trainer.build_hooks = _build_hooks_with_faults


def _install_kill_in_save(spec):
    count_at, stage = spec.split(":")
    count_at = int(count_at)
    saves = {"n": 0, "writes": 0}
    real_replace, real_save = os.replace, torch.save

    def replace(src, dst, *args, **kwargs):
        dst_s = os.fspath(dst)
        if dst_s.endswith(".pth"):
            saves["n"] += 1
            if saves["n"] == count_at and stage == "before_rename":
                _die()
            real_replace(src, dst, *args, **kwargs)
            if saves["n"] == count_at and stage == "after_rename":
                _die()
            return None
        if os.path.basename(dst_s) == "last_checkpoint" and saves["n"] == count_at:
            if stage == "tag_before_rename":
                _die()
            real_replace(src, dst, *args, **kwargs)
            if stage == "tag_after_rename":
                _die()
            return None
        return real_replace(src, dst, *args, **kwargs)

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "model" in obj and hasattr(f, "write"):
            saves["writes"] += 1
        if stage == "write" and saves["writes"] == count_at and hasattr(f, "write") and isinstance(obj, dict):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _die()
        return real_save(obj, f, *args, **kwargs)

    os.replace = replace
    torch.save = save


class _DiskFull(io.FileIO):
    """A file on a disk with a few kB left: writes past that fail with ENOSPC, as the kernel's do."""

    room = 4096

    def write(self, data):
        n = min(len(data), self.room)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return super().write(bytes(data[:n]))


def _install_save_error(spec):
    import tempfile

    count_at, code = spec.split(":")
    count_at, code = int(count_at), getattr(errno, code)
    state = {"saves": 0, "full_fd": None}
    real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen

    def mkstemp(*args, **kwargs):
        if ".pth.tmp-" in kwargs.get("prefix", ""):
            state["saves"] += 1
            if state["saves"] == count_at:
                if code != errno.ENOSPC:
                    raise OSError(code, os.strerror(code), kwargs.get("dir"))
                fd, name = real_mkstemp(*args, **kwargs)
                state["full_fd"] = fd
                return fd, name
        return real_mkstemp(*args, **kwargs)

    def fdopen(fd, *args, **kwargs):
        if fd == state["full_fd"]:
            state["full_fd"] = None
            return io.BufferedWriter(_DiskFull(fd, "wb"))
        return real_fdopen(fd, *args, **kwargs)

    tempfile.mkstemp, os.fdopen = mkstemp, fdopen


if os.environ.get("CPM_TEST_SAVE_ERROR"):
    _install_save_error(os.environ["CPM_TEST_SAVE_ERROR"])


if os.environ.get("CPM_TEST_KILL_IN_SAVE"):
    _install_kill_in_save(os.environ["CPM_TEST_KILL_IN_SAVE"])


if __name__ == "__main__":
    args = train_net.get_parser().parse_args()
    if hasattr(train_net, "run"):
        sys.exit(train_net.run(args, main_func=train_net.main))
    # tools/train_net.py before the reliability work (used to show the tests fail there)
    train_net.check_output_dir(train_net.build_cfg(args).OUTPUT_DIR, args.resume)
    train_net.launch(train_net.main, args.num_gpus, num_machines=args.num_machines,
                     machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
