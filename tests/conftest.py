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
