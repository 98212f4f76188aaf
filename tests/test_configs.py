"""Every shipped config merges onto add_cpm_config, names registered datasets, and builds."""
from pathlib import Path

import pytest
import torch

import cpm_d2  # noqa: F401
from cpm_d2.config import get_cfg

CONFIGS = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def _load(path):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    return cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: Path(p).name)
def test_config_merges_and_is_consistent(path):
    cfg = _load(path)
    assert cfg.MODEL.META_ARCHITECTURE == "CPM"
    assert cfg.INPUT.FORMAT == "RGB"
    # the audio backbone must take as many channels as the front end produces
    assert cfg.MODEL.AUDIO.IN_CHANNELS == cfg.INPUT.AUDIO.CHANNELS, path
    # nothing may be fetched at run time
    assert "://" not in cfg.MODEL.WEIGHTS, f"{path}: MODEL.WEIGHTS must be a local file, got {cfg.MODEL.WEIGHTS}"
    from detectron2.data import DatasetCatalog

    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        assert name in DatasetCatalog.list(), f"{path}: dataset {name!r} is not registered"


def _leaves(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_get_cfg_keeps_detectron2_defaults():
    """cpm_d2's get_cfg() only adds keys: every key detectron2 defines keeps detectron2's default
    (the AVS recipe's values live in configs/Base-AVS.yaml)."""
    from detectron2.config import get_cfg as d2_get_cfg

    theirs, ours = _leaves(d2_get_cfg()), _leaves(get_cfg())
    assert not [k for k in theirs if k not in ours]
    changed = {k: (v, ours[k]) for k, v in theirs.items() if ours[k] != v}
    assert not changed, f"detectron2 default -> cpm_d2 default: {changed}"


# Row files (tools/ablation.py rows) name their row's switches even where a value equals the base's.
ROW_DIRS = ("ablations", "stereo_rows")


@pytest.mark.parametrize("path", [p for p in CONFIGS if Path(p).parent.name not in ROW_DIRS],
                         ids=lambda p: Path(p).name)
def test_yaml_sets_no_package_key_to_the_value_it_inherits(path):
    """A key cpm_d2 adds has one home for its value: a YAML that sets it to what its _BASE_ (or,
    without one, the code default) already gives is flagged, so the recipe is not written twice."""
    import yaml
    from detectron2.config import get_cfg as d2_get_cfg

    raw = yaml.safe_load(Path(path).read_text()) or {}
    base = raw.pop("_BASE_", None)
    inherited = get_cfg()
    if base:
        inherited.merge_from_file(str(Path(path).parent / base))
    inherited, d2_keys = _leaves(inherited), set(_leaves(d2_get_cfg()))

    def same(a, b):
        return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)

    restated = sorted(k for k, v in _leaves(raw).items()
                      if k not in d2_keys and k in inherited and same(v, inherited[k]))
    assert not restated, f"{path} sets these keys to the value they already have; delete the lines: {restated}"


@pytest.mark.slow
def test_paper_config_builds_r50_model():
    from detectron2.modeling import build_model

    cfg = _load(str(Path(__file__).resolve().parents[1] / "configs" / "avss_r50.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.backbone.parameters())
    assert 20e6 < n_params < 30e6  # a ResNet-50 trunk (~23.5M parameters)
    assert type(model.class_predictor).__name__ == "GMMClassPredictor"
    assert cfg.MODEL.CPM.ENABLED
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: Path(p).name)
def test_vcp_hears_the_clean_audio_except_in_the_row_about_it(path):
    """Every config decodes VCP's prompts on the clean audio (the key's default), except the
    ablation row that measures the mixture."""
    expected = "mixture" if Path(path).name == "x_vcp_mixture_audio.yaml" else "clean"
    assert _load(path).MODEL.CPM.VCP.AUDIO == expected


@pytest.mark.parametrize("variant, method", [("avss_r50_point_prompts.yaml", "avss_r50.yaml"),
                                             ("synthetic/cpm_r18_hard_point_prompts.yaml", "synthetic/cpm_r18_hard.yaml")])
def test_point_prompt_configs_change_only_the_class_head(variant, method):
    """The shipped "Point Rep." variants are the paper's configs with a softmax head whose prompts are
    its learnable table; everything else (CPM's objectives, data, schedule) is the method's."""
    root = Path(__file__).resolve().parents[1] / "configs"
    v, m = _load(str(root / variant)), _load(str(root / method))
    assert m.MODEL.MASK_FORMER.CLASS_PREDICTOR == "GMMClassPredictor" and m.MODEL.CPM.ENABLED
    assert v.MODEL.MASK_FORMER.CLASS_PREDICTOR == "LinearClassPredictor"
    assert v.MODEL.CPM.LINEAR_HEAD_PROMPTS == "embedding"
    v.defrost()
    v.MODEL.MASK_FORMER.CLASS_PREDICTOR = m.MODEL.MASK_FORMER.CLASS_PREDICTOR
    v.OUTPUT_DIR = m.OUTPUT_DIR
    assert v == m
