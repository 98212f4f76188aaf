from .cpm import CPM

__all__ = ["CPM"]
