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
* hooks: best-mIoU checkpoint next to ``last_checkpoint``, and the matching-stability (STS) hook;
* exact resume (:mod:`cpm_d2.engine.resume`): the train loader is a
  :class:`~cpm_d2.engine.resume.ResumableTrainLoader` (detectron2's ``TrainingSampler`` order,
  restartable at any batch), checkpoints also hold every rank's global random states and the
  data stream's seed, and hooks run on their own random stream, so ``--resume`` after iteration
  ``k`` repeats the uninterrupted run's iterations ``k+1, ...``.
"""
import itertools
import logging
import os
import weakref

import torch

from detectron2.data import MetadataCatalog, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.projects.deeplab import build_lr_scheduler as build_deeplab_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from cpm_d2.checkpoint import AVSCheckpointer
from cpm_d2.checkpoint.loading import MIN_BACKBONE_SHARE
from cpm_d2.data.datasets.account import loading_policy

from .num_classes import check_num_classes
from .resume import ResumableTrainLoader, TrainBatchStream, get_rng_state, hooks_seed, isolated_rng, set_rng_state

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


class _ResumableBestCheckpointer(hooks.BestCheckpointer):
    """detectron2's BestCheckpointer whose best score so far is checkpointed (a resumed run keeps it)."""

    def state_dict(self):
        if getattr(self, "best_metric", None) is None:
            return {}
        return {"best_metric": float(self.best_metric), "best_iter": int(self.best_iter)}

    def load_state_dict(self, state_dict):
        if "best_metric" in state_dict:
            self.best_metric, self.best_iter = float(state_dict["best_metric"]), int(state_dict["best_iter"])


def _wrap_ddp(model):
    """detectron2's DDP wrapper, with device_ids=None for CPU processes and unused parameters allowed."""
    device = next(model.parameters()).device  # the rank's GPU (cpm_d2.compat.run_rank set it), or the CPU
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    return create_ddp_model(model, broadcast_buffers=False, find_unused_parameters=True, device_ids=device_ids)


class Trainer(DefaultTrainer):
    """DefaultTrainer with the AVS data, evaluators, optimizer, schedule and DDP settings.

    ``allow_partial_weights``: start from a MODEL.WEIGHTS file that loads no tensor or less than
    ``MIN_BACKBONE_SHARE`` of the visual backbone (refused by default: a file in another layout).
    """

    def __init__(self, cfg, *, allow_partial_weights=False):
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
        self.checkpointer = AVSCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
            min_backbone_share=None if allow_partial_weights else MIN_BACKBONE_SHARE,
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self._saved_rng = None  # (iteration, [state of rank 0, rank 1, ...]) for the next checkpoint
        self._resumed_rng = None  # the states a checkpoint gave, restored at the start of train()
        self.register_hooks(self.build_hooks())

    # Checkpoints carry the optimizer (AdamW moments) so --resume continues the same run. Current
    # detectron2 already stores it under "_trainer"; 0.6 stores only the iteration and hooks.
    # For an *exact* resume they also carry every rank's random states and the data stream's
    # seed (cpm_d2.engine.resume); the position in the stream is the next iteration.
    def state_dict(self):
        ret = super().state_dict()
        ret.setdefault("_trainer", self._trainer.state_dict())
        if self._saved_rng is not None and self._saved_rng[0] == self.iter:
            ret["rng_states"] = self._saved_rng[1]
        loader = self._resumable_loader()
        if loader is not None:
            ret["data"] = dict(loader.state_dict(), next_batch=self.iter + 1)
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        loader = self._resumable_loader()
        if loader is not None and "data" in state_dict:
            loader.load_state_dict(state_dict["data"])
        self._resumed_rng = state_dict.get("rng_states")
        if self._resumed_rng is None or "data" not in state_dict:
            logger.warning(
                f"the checkpoint of iteration {self.iter} holds no random states or data-stream state (saved "
                "by an older cpm_d2, or outside the checkpoint schedule): training continues, but not exactly "
                "as the uninterrupted run would have"
            )

    # ------------------------------------------------------------------ exact resume
    def _resumable_loader(self):
        loader = getattr(self._trainer, "data_loader", None)
        return loader if isinstance(loader, ResumableTrainLoader) else None

    def _checkpoint_may_follow(self):
        """Whether a hook may save a checkpoint after this step (periodic, final, or best-metric)."""
        nxt, cfg = self.iter + 1, self.cfg
        if nxt >= self.max_iter:
            return True
        if cfg.SOLVER.CHECKPOINT_PERIOD > 0 and nxt % cfg.SOLVER.CHECKPOINT_PERIOD == 0:
            return True
        return cfg.TEST.EVAL_PERIOD > 0 and nxt % cfg.TEST.EVAL_PERIOD == 0

    def _data_seed(self):
        loader = self._resumable_loader()
        return loader.stream.seed if loader is not None else max(int(self.cfg.SEED), 0)

    def before_train(self):
        super().before_train()
        loader = self._resumable_loader()
        if loader is not None:
            loader.start_batch = self.start_iter  # read at the loader's first next(), i.e. in run_step
        if self._resumed_rng is not None and self.start_iter > 0:
            states, rank = self._resumed_rng, comm.get_rank()
            if len(states) == comm.get_world_size():
                set_rng_state(states[rank])
            else:
                logger.warning(
                    f"the checkpoint holds random states of {len(states)} process(es), this run has "
                    f"{comm.get_world_size()}: random draws do not continue exactly"
                )
        self._resumed_rng = None

    def after_train(self):
        """detectron2's, except after a failed step: every hook still ends, but a hook's own error (e.g. a
        writer flushing to the same full or read-only disk) is logged instead of replacing the training's."""
        if self.iter >= self.max_iter:  # detectron2's convention: training finished
            return super().after_train()
        self.storage.iter = self.iter
        for h in self._hooks:
            try:
                h.after_train()
            except Exception as e:
                logger.warning(f"after the training error, {type(h).__name__} failed to end too: {type(e).__name__}: {e}")

    def after_step(self):
        # The training stream's states as step iter+1 will start from them; a checkpoint written
        # by a hook below stores them. Hooks then draw from their own stream, and the training
        # stream is put back, so evaluation or logging never shift the training's random draws.
        if self._checkpoint_may_follow():
            state = get_rng_state(plain=True)
            states = comm.gather(state, dst=0) if comm.get_world_size() > 1 else [state]
            self._saved_rng = (self.iter, states if comm.is_main_process() else None)
        with isolated_rng(hooks_seed(self._data_seed(), comm.get_rank(), self.iter)):
            super().after_step()

    def build_hooks(self):
        hook_list = super().build_hooks()
        cfg = self.cfg
        if cfg.TEST.EVAL_PERIOD > 0 and cfg.DATASETS.TEST and cfg.TEST.AVS.SAVE_BEST_METRIC:
            # After the EvalHook (which DefaultTrainer puts before the writers).
            best = _ResumableBestCheckpointer(
                cfg.TEST.EVAL_PERIOD, self.checkpointer, cfg.TEST.AVS.SAVE_BEST_METRIC, mode="max"
            )
            eval_pos = next(i for i, h in enumerate(hook_list) if isinstance(h, hooks.EvalHook))
            hook_list.insert(eval_pos + 1, best)
        if cfg.TEST.AVS.STS_PERIOD > 0:
            from cpm_d2.evaluation import STSHook

            hook_list.insert(-1, STSHook(cfg.TEST.AVS.STS_PERIOD))
        return hook_list

    @classmethod
    def build_model(cls, cfg):
        """detectron2's, after :func:`check_num_classes` (a wrong NUM_CLASSES fails here, not at evaluation)."""
        check_num_classes(cfg)
        return super().build_model(cfg)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's train loader semantics (TrainingSampler order, per-rank batches, optional
        aspect-ratio grouping) as a :class:`ResumableTrainLoader` that ``--resume`` restarts exactly.
        Datasets load under ``DATASETS.ALLOW_INCOMPLETE`` (and log their loading summary)."""
        from cpm_d2.data import AVSDatasetMapper

        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            raise ValueError(
                f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN!r} is not supported: cpm_d2 trains with "
                "'TrainingSampler' (AVS dataset dicts carry no per-instance annotations to re-weight)"
            )
        world = comm.get_world_size()
        if cfg.SOLVER.IMS_PER_BATCH <= 0 or cfg.SOLVER.IMS_PER_BATCH % world:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be a positive multiple of the number of "
                f"processes ({world})"
            )
        with loading_policy(cfg.DATASETS.ALLOW_INCOMPLETE):
            dataset = get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
            )
            mapper = AVSDatasetMapper(cfg, is_train=True)  # its off-screen noise pool loads the train sets too
        seed = int(cfg.SEED) if cfg.SEED >= 0 else int(comm.shared_random_seed())
        stream = TrainBatchStream(
            dataset,
            mapper,
            batch_size=cfg.SOLVER.IMS_PER_BATCH // world,
            seed=seed,
            rank=comm.get_rank(),
            world_size=world,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        )
        return ResumableTrainLoader(stream, num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader with the AVS mapper; the dataset loads under ``DATASETS.ALLOW_INCOMPLETE``."""
        from cpm_d2.data import AVSDatasetMapper

        with loading_policy(cfg.DATASETS.ALLOW_INCOMPLETE):
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

