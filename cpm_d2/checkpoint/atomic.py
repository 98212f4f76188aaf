"""Atomic checkpoint writes (work in progress: filled in by the reliability work, issue #13)."""

__all__ = ["AtomicCheckpointSaving"]


class AtomicCheckpointSaving:
    """Mixin for a detectron2 ``Checkpointer``: overrides ``save`` / ``tag_last_checkpoint``."""
