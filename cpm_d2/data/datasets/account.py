"""The account of one dataset load: what it kept, what it left out and why, and the skip policy.

Every loader (AVSS layout, AVSBench-Objects, VPO) fills a :class:`LoadAccount` while it reads a
split and logs its summary once (clips, frames, labelled frames, records; then anything skipped,
excluded or noticed, by reason, with the first names). Three kinds of entries:

* **skipped**: a clip or labelled frame the layout promises but whose files are absent (clip
  folder, frames, audio, label maps), or a clip without any label map. That changes what the
  split means, so by default it is an error naming the item (``FileNotFoundError``); inside
  ``loading_policy(allow_incomplete=True)`` (``DATASETS.ALLOW_INCOMPLETE True`` in training)
  the item is skipped and listed in the summary instead.
* **excluded**: left out by the dataset's own definition (e.g. ``avss_ss_test`` keeps only
  single-source clips). Never an error.
* **noted**: not loaded, and not promised either, but probably not what the user meant: a clip
  folder (or VPO image) that no metadata row lists, frames of a partly labelled clip without a
  label map.

Corrupt files and bad metadata are never skipped: the loaders raise on them whatever the policy.
"""
import contextlib
import contextvars
import logging
import os
from collections import OrderedDict

from detectron2.utils.logger import log_first_n

__all__ = ["LoadAccount", "loading_policy", "allow_incomplete", "dataset_name_scope", "ALLOW_INCOMPLETE_HINT"]

logger = logging.getLogger(__name__)

_ALLOW_INCOMPLETE = contextvars.ContextVar("cpm_d2_allow_incomplete", default=False)
_DATASET_NAME = contextvars.ContextVar("cpm_d2_dataset_name", default=None)
ALLOW_INCOMPLETE_HINT = (
    "to train or evaluate without it, set DATASETS.ALLOW_INCOMPLETE True (it is then skipped and listed in the "
    "loading summary)"
)
EXAMPLES = 5  # names shown per reason in the summary


@contextlib.contextmanager
def loading_policy(allow_incomplete):
    """Inside: loaders skip (and report) missing clips and frames when ``allow_incomplete``, else raise."""
    token = _ALLOW_INCOMPLETE.set(bool(allow_incomplete))
    try:
        yield
    finally:
        _ALLOW_INCOMPLETE.reset(token)


def allow_incomplete():
    """The policy in force (False outside :func:`loading_policy`)."""
    return _ALLOW_INCOMPLETE.get()


@contextlib.contextmanager
def dataset_name_scope(name):
    """Inside: loads are reported under the registered dataset ``name`` (set by ``register_lazy``)."""
    token = _DATASET_NAME.set(name)
    try:
        yield
    finally:
        _DATASET_NAME.reset(token)


class LoadAccount:
    """Counts and reasons of one load of one split (see the module docstring).

    Args:
        source: what is read, e.g. ``"AVSS layout at /data/avss"``.
        split: the split loaded.
    """

    def __init__(self, source, split):
        self.source, self.split = source, split
        self.name = _DATASET_NAME.get()
        self.clips = self.frames = self.labelled = 0
        self.entries = OrderedDict()  # (kind, reason) -> list of item names

    def keep(self, frames, labelled):
        """A clip whose ``labelled`` frames (of ``frames``) become records."""
        self.clips += 1
        self.frames += int(frames)
        self.labelled += int(labelled)

    def missing(self, reason, item, message):
        """A promised clip or frame is absent: raise ``FileNotFoundError(message)`` unless skips are
        allowed; then record ``item`` under ``reason`` and return (the caller skips it)."""
        if not allow_incomplete():
            raise FileNotFoundError(f"{message}; {ALLOW_INCOMPLETE_HINT}")
        self._add("skipped", reason, item)

    def exclude(self, reason, item):
        """``item`` is not in this dataset by its definition (never an error)."""
        self._add("excluded", reason, item)

    def note(self, reason, item):
        """``item`` is not loaded and not promised, but worth the user's attention."""
        self._add("noted", reason, item)

    def note_unlisted(self, folder, listed, table, prefix=""):
        """Note each entry of ``folder`` (hidden ones aside; a file by its name without extension) that
        ``listed`` lacks: a clip or image on disk that no row of ``table`` names is not loaded."""
        if not os.path.isdir(folder):
            return
        for name in sorted(os.listdir(folder)):
            stem = name if os.path.isdir(os.path.join(folder, name)) else os.path.splitext(name)[0]
            if not name.startswith(".") and stem not in listed:
                self.note(f"on disk, in no {table} row", prefix + stem)

    def _add(self, kind, reason, item):
        self.entries.setdefault((kind, reason), []).append(str(item))

    def items(self, kind):
        """``{reason: [names]}`` of one kind (``"skipped"``, ``"excluded"`` or ``"noted"``)."""
        return {reason: names for (k, reason), names in self.entries.items() if k == kind}

    def summary(self):
        """The text logged: one line of counts, then a table of the entries (if any)."""
        from tabulate import tabulate

        name = f"dataset {self.name!r}: " if self.name else ""
        head = (f"{name}split {self.split!r} of {self.source}: {self.clips} clips, {self.frames} frames, "
                f"{self.labelled} labelled frames (= records)")
        if not self.entries:
            return head + "; nothing skipped"
        rows = []
        for (kind, reason), names in self.entries.items():
            more = f"; ... (+{len(names) - EXAMPLES} more)" if len(names) > EXAMPLES else ""
            shown = "; ".join(names[:EXAMPLES]) + more
            rows.append((kind, reason, len(names), shown))
        return head + ":\n" + tabulate(rows, headers=["", "reason", "count", "items"], tablefmt="pipe")

    def log(self):
        """Log :meth:`summary` (once per process for the same text: a test set is loaded at every evaluation)."""
        level = logging.WARNING if self.items("skipped") or self.items("noted") else logging.INFO
        log_first_n(level, self.summary(), name=__name__, key="message")
