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
