"""``Trainer``: detectron2's ``DefaultTrainer`` specialised for audio-visual segmentation.

What it changes, and why:

* data: :class:`~cpm_d2.data.AVSDatasetMapper` for train and test loaders;
* evaluation: :class:`~cpm_d2.evaluation.AVSEvaluator` (both AVS protocols);
* optimizer: AdamW (or SGD) with a learning-rate multiplier on the visual *and* audio backbones,
  no weight decay on normalisation layers and embeddings, and full-model gradient-norm clipping
  (Mask2Former's recipe);
* schedule: warmup + poly (``detectron2.projects.deeplab``);
* DDP: ``find_unused_parameters=True`` (the CPM branch does not touch every parameter every
  step), ``device_ids=None`` on CPU so ``--num-gpus N`` runs N gloo processes without a GPU;
* AMP only when CUDA is present;
* a NaN/inf loss raises detectron2's ``FloatingPointError`` naming the offending term(s);
* hooks: best-mIoU checkpoint next to ``last_checkpoint``, and the matching-stability (STS) hook.
"""
import itertools
import logging
import os
import weakref

import torch

from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.projects.deeplab import build_lr_scheduler as build_deeplab_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from cpm_d2.checkpoint import AVSCheckpointer

__all__ = ["Trainer", "build_optimizer", "check_output_dir", "OutputDirNotEmpty"]

logger = logging.getLogger(__name__)

_NORM_TYPES = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.GroupNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)
# Parameters that are embeddings although they are plain nn.Parameters (queries, level embeds).
_EMBED_NAME_HINTS = ("query_feat", "query_embed", "level_embed", "query_pos", "pos_embed")
_BACKBONE_PREFIXES = ("backbone.", "audio_backbone.")


class OutputDirNotEmpty(RuntimeError):
    """Training would write over checkpoints of an earlier run."""


def check_output_dir(output_dir, resume):
    """Refuse to start a fresh run in a folder that already holds checkpoints.

    detectron2 would silently overwrite ``model_final.pth`` and ``last_checkpoint``; we ask the
    user to choose: ``--resume`` continues that run, another OUTPUT_DIR starts a new one.
    """
    marker = os.path.join(output_dir, "last_checkpoint")
    if not resume and os.path.exists(marker):
        with open(marker) as f:
            last = f.read().strip()
        raise OutputDirNotEmpty(
            f"OUTPUT_DIR {output_dir!r} already holds checkpoints of an earlier run (last_checkpoint -> "
            f"{last}). Pass --resume to continue it, or set OUTPUT_DIR to a new folder."
        )


def _named_param_groups(model, cfg):
    """One param group per parameter: lr and weight decay by module type and name."""
    base_lr = cfg.SOLVER.BASE_LR
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            full_name = f"{module_name}.{name}" if module_name else name
            lr, weight_decay = base_lr, cfg.SOLVER.WEIGHT_DECAY
            if full_name.startswith(_BACKBONE_PREFIXES):
                lr = base_lr * cfg.SOLVER.BACKBONE_MULTIPLIER
            if isinstance(module, _NORM_TYPES):
                weight_decay = cfg.SOLVER.WEIGHT_DECAY_NORM
            elif isinstance(module, torch.nn.Embedding) or any(h in full_name for h in _EMBED_NAME_HINTS):
                weight_decay = cfg.SOLVER.WEIGHT_DECAY_EMBED
            groups.append({"params": [param], "lr": lr, "weight_decay": weight_decay, "name": full_name})
    return groups


def _with_full_model_clipping(optimizer_cls, clip_value, norm_type):
    """Subclass ``optimizer_cls`` so every step first clips the gradient norm of all parameters."""

    class FullModelGradientClipping(optimizer_cls):
        def step(self, closure=None):
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, clip_value, norm_type=norm_type)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = optimizer_cls.__name__ + "WithFullModelGradientClipping"
    return FullModelGradientClipping


def build_optimizer(cfg, model):
    """AdamW/SGD over per-parameter groups, with Mask2Former-style gradient clipping."""
    groups = _named_param_groups(model, cfg)
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer_cls, kwargs = torch.optim.AdamW, {}
    elif name == "SGD":
        optimizer_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_cls = _with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
        optimizer = optimizer_cls(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)
    else:
        optimizer = maybe_add_gradient_clipping(cfg, optimizer_cls)(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)
    return optimizer


class _NamedNonFiniteLossMixin:
    """Raise detectron2's FloatingPointError, naming each non-finite loss term."""

    def _write_metrics(self, loss_dict, data_time, *args, **kwargs):
        bad = {k: float(v) for k, v in loss_dict.items() if not torch.isfinite(torch.as_tensor(v)).all()}
        if bad:
            terms = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
            raise FloatingPointError(
                f"Loss became infinite or NaN at iteration={self.iter}! Non-finite term(s): {terms}.\n"
                f"loss_dict = {({k: float(v) for k, v in loss_dict.items()})}"
            )
        return super()._write_metrics(loss_dict, data_time, *args, **kwargs)


class AVSSimpleTrainer(_NamedNonFiniteLossMixin, SimpleTrainer):
    pass


class AVSAMPTrainer(_NamedNonFiniteLossMixin, AMPTrainer):
    pass


def _wrap_ddp(model):
    """detectron2's DDP wrapper, with device_ids=None for CPU processes and unused parameters allowed."""
    device_ids = [comm.get_local_rank()] if next(model.parameters()).is_cuda else None
    return create_ddp_model(model, broadcast_buffers=False, find_unused_parameters=True, device_ids=device_ids)


class Trainer(DefaultTrainer):
    """DefaultTrainer with the AVS data, evaluators, optimizer, schedule and DDP settings."""

    def __init__(self, cfg):
        # Same steps as DefaultTrainer.__init__, with our DDP wrapper and AMP/NaN policies.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = _wrap_ddp(model)
        use_amp = cfg.SOLVER.AMP.ENABLED and torch.cuda.is_available()
        if cfg.SOLVER.AMP.ENABLED and not use_amp:
            logger.warning("SOLVER.AMP.ENABLED is set but CUDA is not available: training in fp32.")
        self._trainer = (AVSAMPTrainer if use_amp else AVSSimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AVSCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # Checkpoints carry the optimizer (AdamW moments) so --resume continues the same run. Current
    # detectron2 already stores it under "_trainer"; 0.6 stores only the iteration and hooks.
    def state_dict(self):
        ret = super().state_dict()
        ret.setdefault("_trainer", self._trainer.state_dict())
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    def build_hooks(self):
        hook_list = super().build_hooks()
        cfg = self.cfg
        if cfg.TEST.EVAL_PERIOD > 0 and cfg.DATASETS.TEST and cfg.TEST.AVS.SAVE_BEST_METRIC:
            # After the EvalHook (which DefaultTrainer puts before the writers).
            best = hooks.BestCheckpointer(
                cfg.TEST.EVAL_PERIOD, self.checkpointer, cfg.TEST.AVS.SAVE_BEST_METRIC, mode="max"
            )
            eval_pos = next(i for i, h in enumerate(hook_list) if isinstance(h, hooks.EvalHook))
            hook_list.insert(eval_pos + 1, best)
        if cfg.TEST.AVS.STS_PERIOD > 0:
            from cpm_d2.evaluation import STSHook

            hook_list.insert(-1, STSHook(cfg.TEST.AVS.STS_PERIOD))
        return hook_list

    @classmethod
    def build_train_loader(cls, cfg):
        from cpm_d2.data import AVSDatasetMapper

        return build_detection_train_loader(cfg, mapper=AVSDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        from cpm_d2.data import AVSDatasetMapper

        return build_detection_test_loader(cfg, dataset_name, mapper=AVSDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        from cpm_d2.evaluation import build_avs_evaluator

        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "avs")
        if evaluator_type != "avs":
            raise ValueError(f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; cpm_d2 evaluates 'avs'")
        return build_avs_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_deeplab_lr_scheduler(cfg, optimizer)

