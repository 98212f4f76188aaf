"""``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` against the datasets a config names, before a model is built.

A wrong number of classes would otherwise train to the end and fail only at evaluation (or, with
no test set, never). :func:`check_num_classes` compares it with the ``stuff_classes`` metadata of
every registered dataset of ``DATASETS.TRAIN`` and ``DATASETS.TEST``; the Trainer and
``AVSPredictor`` call it when they are built.
"""
from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["check_num_classes"]

_KEY = "MODEL.SEM_SEG_HEAD.NUM_CLASSES"


def _preview(names, limit=4):
    shown = ", ".join(map(str, names[:limit]))
    return shown + (", ..." if len(names) > limit else "")


def check_num_classes(cfg):
    """Raise ValueError naming the dataset, both numbers and the key to change when a registered
    dataset of ``cfg.DATASETS.TRAIN`` / ``TEST`` has another number of ``stuff_classes`` than
    ``cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES``. Unregistered names are left to detectron2's own error,
    datasets without ``stuff_classes`` are not checked."""
    num_classes = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    registered = set(DatasetCatalog.list())
    counts = {}  # dataset -> (config key, its classes)
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS.get(key, ()):
            if name in registered and name not in counts:
                classes = MetadataCatalog.get(name).get("stuff_classes", None)
                if classes:
                    counts[name] = (f"DATASETS.{key}", list(classes))
    wrong = {name: v for name, v in counts.items() if len(v[1]) != num_classes}
    if not wrong:
        return
    sizes = {len(classes) for _, classes in counts.values()}
    if len(sizes) > 1:
        listing = "; ".join(f"{name!r} ({key}): {len(classes)}" for name, (key, classes) in counts.items())
        raise ValueError(
            f"{_KEY} is {num_classes}, and the datasets of this config do not agree on their number of classes "
            f"({listing}): train and test on datasets with the same classes, then set {_KEY} to that number"
        )
    name, (key, classes) = next(iter(wrong.items()))
    raise ValueError(
        f"{_KEY} is {num_classes}, but dataset {name!r} ({key}) has {len(classes)} classes ({_preview(classes)}, "
        f"background included, from its metadata 'stuff_classes'): set {_KEY} {len(classes)}"
    )
