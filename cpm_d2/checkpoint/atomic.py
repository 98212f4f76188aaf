"""Atomic checkpoint writes: a checkpoint is complete on disk before ``last_checkpoint`` names it.

detectron2 (fvcore) writes ``model_XXXXXXX.pth`` in place and then overwrites ``last_checkpoint``
in place. A process killed during either write leaves a truncated checkpoint, or a
``last_checkpoint`` that is empty or names a truncated file, and ``--resume`` then fails (or
worse, loads part of a file). :class:`AtomicCheckpointSaving` writes both files the POSIX way:

1. serialise into a temporary file in the *same folder* (``.<name>.tmp-<host>-<pid>-<random>``),
2. flush and ``fsync`` it,
3. ``os.replace`` it onto the final name (atomic on a POSIX filesystem) and ``fsync`` the folder,
4. only then write ``last_checkpoint`` the same way (temp file, fsync, replace, fsync folder).

Whatever instant the process dies at, ``<name>.pth`` is either absent, the previous complete
file, or the new complete file, and ``last_checkpoint`` names a complete checkpoint (the new one
only once it is in place). A temporary file left by a killed writer is deleted by the next
save in that folder (only when the process that wrote it, on this host, is gone). Paths that
are not on a local filesystem (e.g. an iopath URL) fall back to detectron2's non-atomic writes,
with a warning.

A write that fails for an OS reason (disk full, read-only or unwritable folder) raises
:class:`CheckpointWriteError`, whose one-line message names the file, the error code (ENOSPC,
EROFS, EACCES, ...) and the checkpoint that stays valid: torch's own error for a full disk
(``inline_container.cc ... unexpected pos``) does not say either.
"""
import contextlib
import errno
import os
import re
import socket
import tempfile

import torch

__all__ = ["AtomicCheckpointSaving", "CheckpointWriteError", "atomic_write_bytes", "fsync_dir",
           "remove_stale_temp_files"]

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
_TEMP_RE = re.compile(r"^\.(?P<base>.+)\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_UMASK = os.umask(0o022)  # read the process umask (mkstemp creates 0600 files; give the final file the usual mode)
os.umask(_UMASK)


class CheckpointWriteError(OSError):
    """A checkpoint file (or ``last_checkpoint``) could not be written; the previous one is untouched."""

    def __init__(self, path, error, previous):
        code = errno.errorcode.get(error.errno) if error.errno else None
        reason = f"{code} ({error.strerror})" if code else str(error)
        kept = (f"the previous checkpoint stays valid (last_checkpoint -> {previous})" if previous
                else "no earlier checkpoint of this run exists")
        super().__init__(error.errno, f"cannot write checkpoint {path}: {reason}; {kept}")

    def __str__(self):
        return self.strerror


def _os_error(exc):
    """The first OSError in ``exc``'s chain of causes and contexts (torch wraps it in a RuntimeError), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def fsync_dir(folder):
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. filesystems that do not support fsync on directories
        pass
    finally:
        os.close(fd)


def _temp_prefix(basename):
    return f".{basename}.tmp-{_HOST}-{os.getpid()}-"


def _atomic_write(path, write):
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync it, then rename it onto ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(os.path.basename(path)), dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    _atomic_write(path, lambda f: f.write(data))


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(folder):
    """Delete temp files of killed atomic writes in ``folder`` (written on this host by a dead process).

    Returns the list of deleted paths.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMP_RE.match(name)
        if m is None or m.group("host") != _HOST:
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and _pid_alive(pid):
            continue  # a live writer (or a reused pid): leave it
        path = os.path.join(folder, name)
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


class AtomicCheckpointSaving:
    """Mixin for a detectron2 ``Checkpointer``: overrides ``save`` / ``tag_last_checkpoint``.

    Same API and file contents as fvcore's ``Checkpointer.save`` (``model``, every
    checkpointable's ``state_dict()``, and the keyword arguments), written atomically (module
    docstring). Only the process with ``save_to_disk`` (the main process) writes.
    """

    def _is_local_dir(self):
        return bool(self.save_dir) and "://" not in str(self.save_dir)

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._is_local_dir():
            self.logger.warning(f"{self.save_dir} is not a local folder: checkpoint writes are not atomic there")
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)

        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must be a plain file name (no folder)")
        with self._naming_os_errors(save_file):
            os.makedirs(self.save_dir, exist_ok=True)
            for path in remove_stale_temp_files(self.save_dir):
                self.logger.info(f"Removed {path}, left by an interrupted checkpoint write")
            self.logger.info(f"Saving checkpoint to {save_file}")
            _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    @contextlib.contextmanager
    def _naming_os_errors(self, path):
        """Turn an OSError (also one torch wrapped) into :class:`CheckpointWriteError` naming ``path``."""
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as e:
            error = _os_error(e)
            if error is None:
                raise
            tag = os.path.join(self.save_dir, "last_checkpoint")
            try:
                with open(tag) as f:
                    previous = os.path.join(self.save_dir, f.read().strip())
            except OSError:
                previous = None
            raise CheckpointWriteError(path, error, previous) from e

    def tag_last_checkpoint(self, last_filename_basename):
        if not self._is_local_dir():
            return super().tag_last_checkpoint(last_filename_basename)
        target = os.path.join(self.save_dir, last_filename_basename)
        if not os.path.isfile(target):
            raise FileNotFoundError(
                f"refusing to point {os.path.join(self.save_dir, 'last_checkpoint')} at {target}: no such file"
            )
        tag = os.path.join(self.save_dir, "last_checkpoint")
        with self._naming_os_errors(tag):
            atomic_write_bytes(tag, last_filename_basename.encode("utf-8"))
