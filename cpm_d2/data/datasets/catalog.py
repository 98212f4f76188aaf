"""Built-in AVS datasets (lazy) and registration from the config.

Every builtin is registered whether or not its folder exists; loading a missing one raises
FileNotFoundError naming the path. Root: ``$DETECTRON2_DATASETS`` (default ``datasets``,
relative to the current directory: the detectron2 convention), read when a dataset is *loaded*
(``DatasetCatalog.get``), not when it is registered: setting the variable after
``import cpm_d2`` works. Loading also brings the dataset's metadata up to date: ``root`` (the
absolute folder loaded) and, where the folder has a ``label2idx.json``, ``stuff_classes``
(at registration they come from the root of that time, or the built-in defaults).

=================================  ==========================================  =========
names                              folder under the root                       classes
=================================  ==========================================  =========
avss_{train,val,test}              AVSBench-semantic (all subsets)             71
avss_{v1s,v1m,v2}_{split}          AVSBench-semantic, one subset               71
avss_ss_test / avss_ms_test        AVSBench-semantic test, single/multi-source 71
avsbench_s4_{train,val,test}       AVSBench-object/Single-source               2 (binary)
avsbench_ms3_{train,val,test}      AVSBench-object/Multi-sources               2 (binary)
vpo_{ss,ms,msmi}_{train,test}      VPO (stereo)                                22
synthetic_avs_{train,val,test}     synthetic_avs (mono)                        5 by default
synthetic_avs_stereo_{split}       synthetic_avs_stereo (stereo)               5 by default
synthetic_avs_hard_{split}         synthetic_avs_hard (preset "hard")          21
synthetic_avs_hard_multimodal_...  synthetic_avs_hard_multimodal (preset)      11
synthetic_avs_stereo_msmi_{split}  synthetic_avs_stereo_msmi (stereo preset)   7
=================================  ==========================================  =========
"""
import logging
import os
from functools import partial

from ..file_io import read_label2idx
from .avsbench_objects import OBJECT_CLASSES, load_avsbench_ms3, load_avsbench_s4
from .avss import (
    AVSS_SUBSETS,
    avss_class_names,
    load_avs_layout,
    load_avss,
    register_avs_dataset,
    register_lazy,
)
from .synthetic import PRESETS, synthetic_class_names
from .vpo import VPO_CLASSES, VPO_SETUPS, load_vpo

__all__ = [
    "datasets_root",
    "register_all_avs_datasets",
    "register_avs_datasets_from_cfg",
    "builtin_dataset_names",
    "load_synthetic_avs",
]

SPLITS = ("train", "val", "test")
logger = logging.getLogger(__name__)


def datasets_root():
    return os.environ.get("DETECTRON2_DATASETS", "datasets")


# (folder, stereo, preset) of the builtin synthetic datasets; names are "<folder>_<split>"
SYNTHETIC_BUILTINS = (
    ("synthetic_avs", False, "default"),
    ("synthetic_avs_stereo", True, "default"),
    ("synthetic_avs_hard", False, "hard"),
    ("synthetic_avs_hard_multimodal", False, "hard_multimodal"),
    ("synthetic_avs_stereo_msmi", True, "stereo_msmi"),
)


def load_synthetic_avs(root, split, stereo=False, preset="default"):
    """Dicts of a generated synthetic dataset; a missing folder says how to generate it."""
    if not os.path.isfile(os.path.join(root, "metadata.csv")):
        flag = f" --preset {preset}" if preset != "default" else " --stereo" if stereo else ""
        raise FileNotFoundError(
            f"synthetic AVS dataset not found: {root}; generate it with "
            f"`python datasets/prepare_synthetic_avs.py --root {root}{flag}`"
        )
    return load_avs_layout(root, split, audio_window=1.0, multi_source=split != "train",
                           source=f"synthetic AVS at {root}")


def _sync_metadata(name, root, classes_from_file):
    """Set ``root`` (and ``stuff_classes`` from ``root/label2idx.json``) of ``name`` if they changed."""
    from detectron2.data import MetadataCatalog

    fields = MetadataCatalog.get(name).as_dict()
    update = {}
    if fields.get("root") != root:
        update["root"] = root
    label_file = os.path.join(root, "label2idx.json")
    if classes_from_file and os.path.isfile(label_file):
        names = read_label2idx(label_file)  # a bad file raises here, naming it
        if list(fields.get("stuff_classes", [])) != names:
            update["stuff_classes"] = names
    if update:
        logger.info(f"dataset {name!r}: metadata {sorted(update)} updated from {root}")
        fields.update(update)
        fields.pop("name", None)
        MetadataCatalog.remove(name)  # detectron2 metadata fields cannot be re-set in place
        MetadataCatalog.get(name).set(**fields)


def _load_builtin(name, folder, classes_from_file, load, *args):
    """Lazy loader of a builtin: resolves ``<datasets_root()>/<folder>`` now, at load time."""
    root = os.path.abspath(os.path.join(datasets_root(), folder))
    _sync_metadata(name, root, classes_from_file)
    return load(root, *args)


def _builtin_specs(root):
    """(name, loader, metadata) for every builtin dataset; ``root`` only sets the initial metadata."""
    specs = []

    def add(name, folder, classes_from_file, load, args, meta):
        loader = partial(_load_builtin, name, folder, classes_from_file, load, *args)
        specs.append((name, loader, dict(meta, root=os.path.abspath(os.path.join(root, folder)))))

    avss = "AVSBench-semantic"
    avss_meta = dict(stuff_classes=avss_class_names(os.path.join(root, avss)), audio_channels=1, is_binary=False)
    for split in SPLITS:
        add(f"avss_{split}", avss, True, load_avss, (split,), avss_meta)
        for subset in AVSS_SUBSETS:
            add(f"avss_{subset}_{split}", avss, True, load_avss, (split, [subset]), avss_meta)
    add("avss_ss_test", avss, True, load_avss, ("test", None, "single"), avss_meta)
    add("avss_ms_test", avss, True, load_avss, ("test", None, "multi"), avss_meta)

    s4, ms3 = os.path.join("AVSBench-object", "Single-source"), os.path.join("AVSBench-object", "Multi-sources")
    for split in SPLITS:
        meta = dict(stuff_classes=list(OBJECT_CLASSES), audio_channels=1, is_binary=True)
        add(f"avsbench_s4_{split}", s4, False, load_avsbench_s4, (split,), meta)
        add(f"avsbench_ms3_{split}", ms3, False, load_avsbench_ms3, (split,), meta)

    for setup in VPO_SETUPS:
        for split in ("train", "test"):
            meta = dict(stuff_classes=list(VPO_CLASSES), audio_channels=2, is_binary=False)
            add(f"vpo_{setup}_{split}", "VPO", False, load_vpo, (setup, split), meta)

    for folder, stereo, preset in SYNTHETIC_BUILTINS:
        label_file = os.path.join(root, folder, "label2idx.json")
        spec = PRESETS[preset]
        names = synthetic_class_names(spec.get("num_classes", 4), spec.get("sound", "separable"),
                                      spec.get("looks_per_class", 1))
        if os.path.isfile(label_file):
            try:
                names = read_label2idx(label_file)
            except (OSError, ValueError) as e:  # never break `import cpm_d2` over a bad file
                logger.warning(f"{e}; using the default synthetic class names")
        meta = dict(stuff_classes=names, audio_channels=2 if stereo else 1, is_binary=False)
        for split in SPLITS:
            add(f"{folder}_{split}", folder, True, load_synthetic_avs, (split, stereo, preset), meta)
    return specs


def builtin_dataset_names():
    return [name for name, _, _ in _builtin_specs(datasets_root())]


def register_all_avs_datasets():
    """Register every builtin (idempotent: names already in the DatasetCatalog are skipped)."""
    from detectron2.data import DatasetCatalog

    registered = set(DatasetCatalog.list())
    for name, loader, meta in _builtin_specs(datasets_root()):
        if name not in registered:
            register_lazy(name, loader, **dict(meta))


def _same_root(a, b):
    return os.path.realpath(os.path.expanduser(str(a))) == os.path.realpath(os.path.expanduser(str(b)))


def register_avs_datasets_from_cfg(cfg):
    """Register each ``[name, root, split]`` of ``cfg.DATASETS.AVS_REGISTER`` (AVSS layout).

    The split names a root's metadata.csv may hold are train / val / test and every split the
    entries name for that root. A name already registered with the same root and split is skipped
    (every worker process calls this); the same name with another root or split (a builtin's name
    included) raises ValueError naming both.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    entries = []
    for entry in cfg.DATASETS.AVS_REGISTER:
        if len(entry) != 3:
            raise ValueError(f"DATASETS.AVS_REGISTER entries are [name, root, split], got {list(entry)}")
        entries.append(tuple(str(x) for x in entry))
    for name, root, split in entries:
        splits = list(SPLITS) + [s for _, r, s in entries if _same_root(r, root)]
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            existing, existing_split = meta.get("root", None), meta.get("split", None)
            if existing is not None and _same_root(existing, root) and existing_split == split:
                continue
            raise ValueError(
                f"dataset {name!r} is already registered with root {existing!r}, split {existing_split!r}; "
                f"DATASETS.AVS_REGISTER asks for root {root!r}, split {split!r}: give this entry another name"
            )
        register_avs_dataset(name, root, split=split, audio_channels=int(cfg.INPUT.AUDIO.CHANNELS), splits=splits)
