"""cpm_d2: the Class-conditional Prompting Machine (CPM) for audio-visual segmentation on Detectron2.

Importing the package applies the detectron2 compatibility fixes (``cpm_d2.compat``), then
registers the meta-architecture, its heads and the built-in datasets with detectron2's
registries. Config: ``add_maskformer_config``, ``add_avs_config``, ``add_cpm_config`` (or
``cpm_d2.config.get_cfg()``). Importing it twice registers nothing twice (Python caches the module).
"""
from . import compat

compat.apply_all()

from .config import add_avs_config, add_cpm_config, add_maskformer_config  # noqa: E402
from . import modeling  # noqa: E402,F401  (registers CPM, backbones, decoders, class predictors)
from .data import register_all_avs_datasets, register_avs_dataset  # noqa: E402

register_all_avs_datasets()  # lazy: nothing is read until a dataset is used

__all__ = ["add_maskformer_config", "add_avs_config", "add_cpm_config", "register_avs_dataset", "AVSPredictor"]
__version__ = "0.1.0"


def __getattr__(name):
    # cpm_d2.AVSPredictor without importing detectron2.engine at `import cpm_d2`
    if name == "AVSPredictor":
        from .engine.predictor import AVSPredictor

        return AVSPredictor
    raise AttributeError(f"module 'cpm_d2' has no attribute {name!r}")
