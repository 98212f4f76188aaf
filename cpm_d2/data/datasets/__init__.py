"""AVS datasets: loaders for each on-disk format, the synthetic generator and the catalog."""
from .avss import register_avs_dataset, load_avs_layout, load_avss, AVSS_CLASSES  # noqa: F401
from .avsbench_objects import load_avsbench_s4, load_avsbench_ms3  # noqa: F401
from .vpo import load_vpo, VPO_CLASSES  # noqa: F401
from .synthetic import generate_synthetic_avs, ensure_synthetic_avs  # noqa: F401
from .catalog import (  # noqa: F401
    builtin_dataset_names,
    datasets_root,
    register_all_avs_datasets,
    register_avs_datasets_from_cfg,
)
