"""Built-in AVS datasets (lazy) and registration from the config.

Every builtin is registered whether or not its folder exists; loading a missing one raises
FileNotFoundError naming the path. Root: ``$DETECTRON2_DATASETS`` (default ``datasets``),
read when :func:`register_all_avs_datasets` runs.

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
=================================  ==========================================  =========
"""
import logging
import os
from functools import partial

from .avsbench_objects import OBJECT_CLASSES, load_avsbench_ms3, load_avsbench_s4
from .avss import (
    AVSS_SUBSETS,
    avss_class_names,
    load_avs_layout,
    load_avss,
    read_label2idx,
    register_avs_dataset,
    register_lazy,
)
from .synthetic import synthetic_class_names
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


def load_synthetic_avs(root, split, stereo=False):
    """Dicts of a generated synthetic dataset; a missing folder says how to generate it."""
    if not os.path.isfile(os.path.join(root, "metadata.csv")):
        flag = " --stereo" if stereo else ""
        raise FileNotFoundError(
            f"synthetic AVS dataset not found: {root}; generate it with "
            f"`python datasets/prepare_synthetic_avs.py --root {root}{flag}`"
        )
    return load_avs_layout(root, split, audio_window=1.0, multi_source=split != "train")


def _builtin_specs(root):
    """(name, loader, metadata) for every builtin dataset."""
    specs = []
    avss_root = os.path.join(root, "AVSBench-semantic")
    avss_meta = dict(stuff_classes=avss_class_names(avss_root), audio_channels=1, is_binary=False, root=avss_root)
    for split in SPLITS:
        specs.append((f"avss_{split}", partial(load_avss, avss_root, split), avss_meta))
        for subset in AVSS_SUBSETS:
            specs.append((f"avss_{subset}_{split}", partial(load_avss, avss_root, split, [subset]), avss_meta))
    specs.append(("avss_ss_test", partial(load_avss, avss_root, "test", None, "single"), avss_meta))
    specs.append(("avss_ms_test", partial(load_avss, avss_root, "test", None, "multi"), avss_meta))

    s4_root = os.path.join(root, "AVSBench-object", "Single-source")
    ms3_root = os.path.join(root, "AVSBench-object", "Multi-sources")
    for split in SPLITS:
        meta = dict(stuff_classes=list(OBJECT_CLASSES), audio_channels=1, is_binary=True)
        specs.append((f"avsbench_s4_{split}", partial(load_avsbench_s4, s4_root, split), dict(meta, root=s4_root)))
        specs.append((f"avsbench_ms3_{split}", partial(load_avsbench_ms3, ms3_root, split), dict(meta, root=ms3_root)))

    vpo_root = os.path.join(root, "VPO")
    for setup in VPO_SETUPS:
        for split in ("train", "test"):
            meta = dict(stuff_classes=list(VPO_CLASSES), audio_channels=2, is_binary=False, root=vpo_root)
            specs.append((f"vpo_{setup}_{split}", partial(load_vpo, vpo_root, setup, split), meta))

    for stereo, folder in ((False, "synthetic_avs"), (True, "synthetic_avs_stereo")):
        syn_root = os.path.join(root, folder)
        label_file = os.path.join(syn_root, "label2idx.json")
        names = synthetic_class_names()
        if os.path.isfile(label_file):
            try:
                names = read_label2idx(label_file)
            except (OSError, ValueError) as e:  # never break `import cpm_d2` over a bad file
                logger.warning(f"{e}; using the default synthetic class names")
        meta = dict(stuff_classes=names, audio_channels=2 if stereo else 1, is_binary=False, root=syn_root)
        for split in SPLITS:
            specs.append((f"{folder}_{split}", partial(load_synthetic_avs, syn_root, split, stereo), meta))
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

    A name already registered with the same root is skipped (every worker process calls this);
    the same name with another root raises ValueError.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for entry in cfg.DATASETS.AVS_REGISTER:
        if len(entry) != 3:
            raise ValueError(f"DATASETS.AVS_REGISTER entries are [name, root, split], got {list(entry)}")
        name, root, split = (str(x) for x in entry)
        if name in DatasetCatalog.list():
            existing = MetadataCatalog.get(name).get("root", None)
            if existing is not None and _same_root(existing, root):
                continue
            raise ValueError(
                f"dataset {name!r} is already registered with root {existing!r}; "
                f"DATASETS.AVS_REGISTER asks for root {root!r}"
            )
        register_avs_dataset(name, root, split=split, audio_channels=int(cfg.INPUT.AUDIO.CHANNELS))
