"""Audio-visual data: dataset registration, the audio front end and the dataset mapper.

``register_all_avs_datasets()`` registers the builtin datasets (lazy; see
``cpm_d2/data/datasets/catalog.py``); ``register_avs_dataset`` registers a new one in the AVSS
layout; ``AVSDatasetMapper`` turns a dataset dict into the model's input. The checked readers and
writers of the files themselves (metadata CSVs, class lists, frames, label maps, wav files) are in
:mod:`cpm_d2.data.file_io`.
"""
from .audio import AudioConfig, AudioFrontEnd, AudioReadError  # noqa: F401
from .datasets import (  # noqa: F401
    builtin_dataset_names,
    ensure_synthetic_avs,
    generate_synthetic_avs,
    register_all_avs_datasets,
    register_avs_dataset,
    register_avs_datasets_from_cfg,
)
from .dataset_mapper import AVSDatasetMapper, build_avs_augmentations  # noqa: F401

__all__ = [
    "AVSDatasetMapper",
    "AudioConfig",
    "AudioFrontEnd",
    "AudioReadError",
    "build_avs_augmentations",
    "builtin_dataset_names",
    "ensure_synthetic_avs",
    "generate_synthetic_avs",
    "register_all_avs_datasets",
    "register_avs_dataset",
    "register_avs_datasets_from_cfg",
]
