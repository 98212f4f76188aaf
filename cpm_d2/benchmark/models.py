"""The pair the benchmark compares, and one step of each.

Both models come from ONE config: **baseline** = ``MODEL.CPM.ENABLED False`` +
``LinearClassPredictor`` (the class-agnostic audio-visual Mask2Former), **CPM** =
``MODEL.CPM.ENABLED True`` (ACP / VCP / PCL as the config says) + ``GMMClassPredictor``. Every
tensor with the same name and shape is copied from CPM to the baseline, so they differ only by
the class head (the GMM has no parameters, the baseline a linear layer) and the CPM-only
projection heads.

A training step is what detectron2's SimpleTrainer runs: forward, sum of the losses,
``zero_grad``, backward, optimizer step (AdamW with full-model clipping from the trainer's
``build_optimizer``). The step and its three phases carry their own profiler labels
(``bench.*``, below) so a profile of a step can be read against the model's labels.
"""
from torch.profiler import record_function

__all__ = [
    "STEP", "FORWARD", "BACKWARD", "OPTIMIZER", "INFER",
    "load_cfg", "pair_cfgs", "build_pair", "sync_fn", "train_step", "infer_step",
]

# Labels of the benchmark's own steps (the model's labels are cpm.* / gmm.*).
STEP = "bench.step"
FORWARD = "bench.forward"
BACKWARD = "bench.backward"
OPTIMIZER = "bench.optimizer"
INFER = "bench.infer"


def load_cfg(path, opts=()):
    """cpm_d2's full config (unfrozen) with ``path`` and ``KEY VALUE`` opts merged."""
    from cpm_d2.config import setup_cfg

    return setup_cfg(path, list(opts), freeze=False)


def pair_cfgs(cfg, device):
    """(baseline cfg, CPM cfg) from one config: same sizes, only the CPM switches differ."""
    cpm = cfg.clone()
    cpm.defrost()
    cpm.MODEL.DEVICE = device
    cpm.MODEL.CPM.ENABLED = True
    cpm.MODEL.MASK_FORMER.CLASS_PREDICTOR = "GMMClassPredictor"
    base = cpm.clone()
    base.MODEL.CPM.ENABLED = False
    base.MODEL.MASK_FORMER.CLASS_PREDICTOR = "LinearClassPredictor"
    return base, cpm


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def build_pair(base_cfg, cpm_cfg, seed=0):
    """Build both models and their optimizers; copy same-name same-shape tensors CPM -> baseline.

    Returns ({"baseline", "cpm"} -> model, {"baseline", "cpm"} -> optimizer, info) where info
    counts the shared tensors and lists the ones only one model has."""
    import torch
    from detectron2.modeling import build_model

    from cpm_d2.engine.trainer import build_optimizer

    torch.manual_seed(seed)
    cpm = build_model(cpm_cfg)
    # the steady state of training: every class's mixture fitted, so every class is prompted (a
    # fresh model prompts a class only once its bank holds enough entries)
    mixtures = getattr(cpm.class_predictor, "mixtures", None)
    if mixtures is not None:
        mixtures.initialized.fill_(True)
    torch.manual_seed(seed)
    base = build_model(base_cfg)
    src, dst = cpm.state_dict(), base.state_dict()
    common = {k: v for k, v in src.items() if k in dst and dst[k].shape == v.shape}
    base.load_state_dict(common, strict=False)
    info = {
        "shared_tensors": len(common),
        "baseline_only": sorted(set(dst) - set(common)),
        "cpm_only": sorted(set(src) - set(common)),
        "params_baseline": _num_params(base),
        "params_cpm": _num_params(cpm),
    }
    models = {"baseline": base, "cpm": cpm}
    optims = {"baseline": build_optimizer(base_cfg, base), "cpm": build_optimizer(cpm_cfg, cpm)}
    return models, optims, info


def sync_fn(device):
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    if device == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def train_step(model, optimizer, batch, sync=lambda: None):
    """One training iteration; ``sync`` runs inside the step label, so the label's time includes
    the device's work."""
    with record_function(STEP):
        with record_function(FORWARD):
            losses = model(batch)
            loss = sum(losses.values())
        with record_function(BACKWARD):
            optimizer.zero_grad()
            loss.backward()
        with record_function(OPTIMIZER):
            optimizer.step()
        sync()


def infer_step(model, batch, sync=lambda: None):
    """One eval forward (``model`` in eval mode) on ``batch``, without gradients."""
    import torch

    with record_function(INFER), torch.no_grad():
        model(batch)
        sync()
