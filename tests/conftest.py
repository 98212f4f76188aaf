"""Shared pytest fixtures."""
import uuid

import pytest

import cpm_d2  # noqa: F401  (compat fixes before any detectron2 import)
from detectron2.data import DatasetCatalog, MetadataCatalog


@pytest.fixture
def names():
    """``names(prefix)`` -> a unique dataset name; every name is removed from the catalogs afterwards."""
    created = []

    def make(prefix="t"):
        created.append(f"{prefix}_{uuid.uuid4().hex[:8]}")
        return created[-1]

    yield make
    for n in created:
        if n in DatasetCatalog.list():
            DatasetCatalog.remove(n)
        if n in MetadataCatalog.list():
            MetadataCatalog.remove(n)


@pytest.fixture
def silent_video(tmp_path):
    """Factory: ``silent_video(name, codec, pix_fmt, rate)`` writes a one-frame 32x32 black video
    with no audio track under ``tmp_path`` (PyAV) and returns its path."""
    import av
    import numpy as np

    def write(name, codec="ffv1", pix_fmt="bgr0", rate=1):
        path = tmp_path / name
        with av.open(str(path), "w") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = 32, 32, pix_fmt
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return path

    return write


class LoadSummaries(list):
    """The loading summaries logged so far (str, in order), and a check of the last one's table."""

    def has(self, kind, reason, item, count=1):
        """Whether the last summary lists ``item`` (a prefix of the items cell) as ``kind`` for ``reason``."""
        import re

        row = rf"\| {kind}\s*\| {re.escape(reason)}\s*\|\s*{count} \| [^\n]*{re.escape(item)}"
        return bool(self) and re.search(row, self[-1]) is not None


@pytest.fixture
def logged():
    """``logged(logger_name)`` -> a list that collects the messages of that logger (INFO and up) while the
    test runs; works also when the logger does not propagate (``setup_logger`` turns propagation off)."""
    import logging

    attached = []

    def collect(name, into=None):
        messages = [] if into is None else into

        class Collect(logging.Handler):
            def emit(self, record):
                messages.append(record.getMessage())

        log = logging.getLogger(name)
        attached.append((log, Collect(level=logging.DEBUG), log.level))
        log.addHandler(attached[-1][1])
        log.setLevel(logging.INFO)
        return messages

    yield collect
    for log, handler, level in attached:
        log.removeHandler(handler)
        log.setLevel(level)


@pytest.fixture
def load_summaries(logged):
    """:class:`LoadSummaries` of the loading summaries logged while the test runs."""
    return logged("cpm_d2.data.datasets.account", LoadSummaries())
