"""One training job per OUTPUT_DIR: a lock file that records the host and pid of the job holding it.

Two jobs writing one folder interleave ``metrics.json``, write every checkpoint twice and leave
whichever model came last. ``tools/train_net.py`` therefore holds ``OUTPUT_DIR/train.lock``
for the whole job, in one process per job (machine 0's launcher when ``--num-gpus`` starts the
workers, global rank 0 when torchrun or SLURM started them: ``cpm_d2/engine/launcher.py``;
evaluation-only runs take no lock):

* the file holds ``{"host", "pid", "started", "command"}`` of its holder and is kept
  ``flock``-ed while the job runs; the lock is released (the file removed) when it ends;
* a second job finds the ``flock`` taken and is refused at once, naming the holder;
* a file left by a job that died (SIGKILL, power loss) is no longer ``flock``-ed: when it was
  written on this host, the next job takes it over and logs a line naming the dead holder;
* a file written on another host is refused (this host cannot tell whether that job still
  runs): the message says to delete it if that job is gone.
"""
import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time

__all__ = ["LOCK_NAME", "OutputDirLocked", "output_dir_lock"]

LOCK_NAME = "train.lock"
logger = logging.getLogger(__name__)


class OutputDirLocked(RuntimeError):
    """Another training job holds (or may hold) the OUTPUT_DIR lock."""


def _record():
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)}


def _read(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        data = json.loads(os.read(fd, 1 << 16).decode("utf-8") or "{}")
    except (UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _holder(record):
    if not record:
        return "a job that is starting (it has not written its host and pid yet)"
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started {record.get('started', '?')}"
            f" ({record.get('command', '?')})")


def _same_file(fd, path):
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _acquire(output_dir):
    """-> (fd of the flock-ed lock file, its path). Raises OutputDirLocked naming the holder."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise OutputDirLocked(
                f"OUTPUT_DIR {output_dir} is in use by another training job: {_holder(holder)} holds {path}. "
                "Wait until it ends, or set OUTPUT_DIR to another folder."
            ) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed the file while we opened it: lock the new one
    previous = _read(fd)
    if previous:
        if previous.get("host") != socket.gethostname():
            os.close(fd)
            raise OutputDirLocked(
                f"OUTPUT_DIR {output_dir} is locked by {_holder(previous)} ({path}); this host cannot tell whether "
                "that job still runs. If it does not, delete the lock file and start again; or set OUTPUT_DIR "
                "to another folder."
            )
        logger.warning(f"OUTPUT_DIR lock {path} was left by {_holder(previous)}, which no longer runs: taken over")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(_record()).encode("utf-8"))
    os.fsync(fd)
    return fd, path


def _release(fd, path):
    try:
        if _same_file(fd, path):
            os.unlink(path)
    except OSError as e:  # e.g. a folder that became read-only: the next job takes the stale file over
        logger.warning(f"could not remove the OUTPUT_DIR lock {path}: {e}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_dir_lock(output_dir):
    """Hold the lock of ``output_dir`` (created if needed) inside the ``with`` block; see the module docstring.

    Raises :class:`OutputDirLocked` naming the holder when another live job holds it.
    """
    fd, path = _acquire(output_dir)
    try:
        yield path
    finally:
        _release(fd, path)
