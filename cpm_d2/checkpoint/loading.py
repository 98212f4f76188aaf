"""Strict checkpoint loading and Mask2Former remapping (work in progress: issue #15 / #13.4)."""

__all__ = ["StrictCheckpointLoading"]


class StrictCheckpointLoading:
    """Mixin for a detectron2 ``Checkpointer``: overrides the loading side (``_load_model`` ...)."""
