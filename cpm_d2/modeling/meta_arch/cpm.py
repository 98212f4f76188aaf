"""Meta-architecture "CPM": an audio-visual Mask2Former (the class-agnostic path of the paper's §3.1).

    images  --backbone--> {res2..res5} --pixel decoder--> ũ_v (B, MASK_DIM, H/4, W/4) + 3 scales
    audio   --audio backbone--> {res2..res5} --audio pixel decoder--> tokens, ũ_a, u_a
    N learnable queries --AudioVisualTransformerDecoder--> per-layer class logits / masks

The pieces are separate methods so the class-conditional path (CPM, part 2) can reuse them:
    preprocess_image(batched_inputs) -> ImageList (normalised, padded to size_divisibility)
    preprocess_audio(batched_inputs, key="audio") -> (B, Ca, T, F)
    encode_visual(images (B, 3, H, W)) -> (mask_features ũ_v, multi_scale_features [3])
    encode_audio(audio (B, Ca, T, F)) -> dict(tokens, tokens_pos, dense ũ_a, feature_map u_a)
    decode(visual, audio, queries=None, query_pos=None, query_padding_mask=None) -> outputs
    prepare_targets(batched_inputs, images) -> [{"labels", "masks", "sem_seg"}] (padded)
    class_agnostic_losses(outputs, targets) -> (weighted losses, final-layer indices)
    observe_assignments(outputs, targets, indices) -> class predictor observe/step, last_assignments
    semantic_inference(mask_cls (Q, C+1), mask_pred (Q, H, W)) -> (C, H, W)

With MODEL.CPM.ENABLED, training adds the class-conditional prompting losses (ACP / VCP / PCL,
paper §3.2) computed by ``prompting.ClassConditionalPrompting`` on the same visual features;
inference is the class-agnostic path either way.
"""
import logging
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from ..backbone import AudioPixelDecoder, build_audio_backbone
from ..criterion import SetCriterion
from ..matcher import HungarianMatcher
from ..pixel_decoder import build_pixel_decoder
from ..transformer_decoder import build_transformer_decoder
from .prompting import ClassConditionalPrompting

__all__ = ["CPM"]

logger = logging.getLogger(__name__)


def _where(x: dict) -> str:
    return x.get("file_name", "<no file_name>")


@META_ARCH_REGISTRY.register()
class CPM(nn.Module):
    """Audio-visual Mask2Former; see the module docstring.

    Training input: list of mapper dicts (contract in CONTRACTS.md: image, audio, instances, sem_seg
    ...). Returns weighted scalar losses "loss_ce", "loss_mask", "loss_dice" and "<name>_<i>" for
    the auxiliary layers, plus the CPM losses ("loss_acp", "loss_vcp_*", "loss_pcl") when
    ``prompting`` is set (MODEL.CPM.ENABLED). Inference returns
    [{"sem_seg": (C, height, width), "audio_class_probs": (C,)}].
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        pixel_decoder: nn.Module,
        audio_backbone: nn.Module,
        audio_pixel_decoder: nn.Module,
        transformer_decoder: nn.Module,
        criterion: SetCriterion,
        weight_dict: Dict[str, float],
        num_classes: int,
        num_queries: int,
        size_divisibility: int,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        ignore_value: int = 255,
        audio_channels: int = 1,
        audio_log_offset: float = 1e-6,
        deep_supervision: bool = True,
        prompting: Optional[ClassConditionalPrompting] = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.audio_backbone = audio_backbone
        self.audio_pixel_decoder = audio_pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.criterion = criterion
        self.weight_dict = dict(weight_dict)
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.size_divisibility = size_divisibility
        self.ignore_value = ignore_value
        self.audio_channels = audio_channels
        self.audio_log_offset = audio_log_offset  # log(mag + offset): for re-encoding mixed magnitudes
        self.deep_supervision = deep_supervision
        # CPM workflow (training only; no parameters or buffers of its own), None = baseline.
        self.prompting = prompting
        if prompting is not None:
            prompting.check_class_predictor(self.class_predictor)
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError("cpm.py: MODEL.PIXEL_MEAN / PIXEL_STD must have 3 (RGB) entries")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # Training iteration counter (checkpointed): passed to class_predictor.step().
        self.register_buffer("_iter", torch.zeros((), dtype=torch.long))
        # Class id assigned to each class-agnostic query by the last matching (CPU, (B, N)).
        self.last_assignments: Optional[torch.Tensor] = None

    @classmethod
    def from_config(cls, cfg):
        if cfg.INPUT.FORMAT != "RGB":
            raise ValueError(f"cpm.py: INPUT.FORMAT must be 'RGB' (images are RGB; PIXEL_MEAN is in RGB order), "
                             f"got {cfg.INPUT.FORMAT!r}")
        mf = cfg.MODEL.MASK_FORMER
        backbone = build_backbone(cfg)
        pixel_decoder = build_pixel_decoder(cfg, backbone.output_shape())
        audio_backbone = build_audio_backbone(cfg)
        audio_pixel_decoder = AudioPixelDecoder(cfg, audio_backbone.output_shape())
        transformer_decoder = build_transformer_decoder(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM)
        matcher = HungarianMatcher(
            cost_class=mf.CLASS_WEIGHT, cost_mask=mf.MASK_WEIGHT, cost_dice=mf.DICE_WEIGHT,
            num_points=mf.TRAIN_NUM_POINTS, mask_cost="focal" if mf.MASK_LOSS == "focal" else "bce",
            focal_alpha=mf.FOCAL_ALPHA, focal_gamma=mf.FOCAL_GAMMA,
        )
        criterion = SetCriterion(
            cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, matcher, eos_coef=mf.NO_OBJECT_WEIGHT,
            num_points=mf.TRAIN_NUM_POINTS, oversample_ratio=mf.OVERSAMPLE_RATIO,
            importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO, mask_loss=mf.MASK_LOSS,
            focal_alpha=mf.FOCAL_ALPHA, focal_gamma=mf.FOCAL_GAMMA,
        )
        base_weights = {"loss_ce": mf.CLASS_WEIGHT, "loss_mask": mf.MASK_WEIGHT, "loss_dice": mf.DICE_WEIGHT}
        weight_dict = dict(base_weights)
        if mf.DEEP_SUPERVISION:
            # one prediction per audio layer (or one of the raw queries) + every visual layer but the last
            num_aux = max(mf.AUDIO_DEC_LAYERS, 1) + mf.DEC_LAYERS - 1
            for i in range(num_aux):
                weight_dict.update({f"{k}_{i}": v for k, v in base_weights.items()})
        size_div = cfg.INPUT.SIZE_DIVISIBILITY
        if size_div <= 0:
            size_div = mf.SIZE_DIVISIBILITY if mf.SIZE_DIVISIBILITY > 0 else backbone.size_divisibility
        return {
            "backbone": backbone,
            "pixel_decoder": pixel_decoder,
            "audio_backbone": audio_backbone,
            "audio_pixel_decoder": audio_pixel_decoder,
            "transformer_decoder": transformer_decoder,
            "criterion": criterion,
            "weight_dict": weight_dict,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "size_divisibility": size_div,
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "audio_channels": cfg.MODEL.AUDIO.IN_CHANNELS,
            "audio_log_offset": cfg.INPUT.AUDIO.LOG_OFFSET,
            "deep_supervision": mf.DEEP_SUPERVISION,
            "prompting": ClassConditionalPrompting(cfg) if cfg.MODEL.CPM.ENABLED else None,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def class_predictor(self):
        """The class head shared by every decoder layer (a ClassPredictor)."""
        return self.transformer_decoder.class_predictor

    # ------------------------------------------------------------------------------ inputs
    def preprocess_image(self, batched_inputs: List[dict]) -> ImageList:
        """Normalise (RGB mean/std) and pad to ``size_divisibility`` (pad value 0 after normalising)."""
        images = []
        for x in batched_inputs:
            img = x.get("image")
            if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3:
                shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
                raise ValueError(f"cpm.py: input {_where(x)}: 'image' must be a 3 x H x W RGB tensor, got {shape}")
            images.append((img.to(self.device).float() - self.pixel_mean) / self.pixel_std)
        return ImageList.from_tensors(images, self.size_divisibility)

    def preprocess_audio(self, batched_inputs: List[dict], key: str = "audio") -> torch.Tensor:
        """Stack ``x[key]`` (Ca, T, F) of every input into (B, Ca, T, F) float32 on the model device."""
        audios = []
        for x in batched_inputs:
            a = x.get(key)
            if not isinstance(a, torch.Tensor) or a.dim() != 3 or a.shape[0] != self.audio_channels:
                shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                raise ValueError(f"cpm.py: input {_where(x)}: {key!r} must be a ({self.audio_channels}, T, F) tensor "
                                 f"(MODEL.AUDIO.IN_CHANNELS = {self.audio_channels}), got {shape}")
            if audios and a.shape != audios[0].shape:
                raise ValueError(f"cpm.py: input {_where(x)}: {key!r} shape {tuple(a.shape)} differs from the first "
                                 f"item's {tuple(audios[0].shape)}; a batch needs one audio window length")
            audios.append(a)
        return torch.stack(audios).to(device=self.device, dtype=torch.float32)

    def prepare_targets(self, batched_inputs: List[dict], images: ImageList) -> List[Dict[str, torch.Tensor]]:
        """Per image: "labels" (K,) int64, "masks" (K, Hp, Wp) bool zero-padded to the padded image
        size, and "sem_seg" (Hp, Wp) int64 padded with the ignore value when the input has one."""
        hp, wp = images.tensor.shape[-2:]
        targets = []
        for x in batched_inputs:
            inst = x.get("instances")
            if inst is None:
                raise ValueError(f"cpm.py: training input {_where(x)} has no 'instances' (the mapper must add them)")
            masks = inst.gt_masks
            masks = getattr(masks, "tensor", masks).to(self.device, torch.bool)
            labels = inst.gt_classes.to(self.device, torch.long)
            if masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
                raise ValueError(f"cpm.py: input {_where(x)}: gt_masks {tuple(masks.shape)} do not match gt_classes "
                                 f"{tuple(labels.shape)}")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"cpm.py: input {_where(x)}: gt_classes outside [0, {self.num_classes - 1}] "
                                 f"(MODEL.SEM_SEG_HEAD.NUM_CLASSES = {self.num_classes})")
            h, w = masks.shape[-2:]
            padded = torch.zeros((masks.shape[0], hp, wp), dtype=torch.bool, device=self.device)
            padded[:, :h, :w] = masks
            t = {"labels": labels, "masks": padded}
            if "sem_seg" in x:
                sem = x["sem_seg"].to(self.device, torch.long)
                t["sem_seg"] = F.pad(sem, (0, wp - sem.shape[-1], 0, hp - sem.shape[-2]), value=self.ignore_value)
            targets.append(t)
        return targets

    # ------------------------------------------------------------------------------ encoders / decoder
    def encode_visual(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """images (B, 3, Hp, Wp) normalised -> (ũ_v (B, MASK_DIM, Hp/4, Wp/4), 3 maps coarsest first)."""
        return self.pixel_decoder(self.backbone(images))

    def encode_audio(self, audio: torch.Tensor) -> Dict[str, torch.Tensor]:
        """audio (B, Ca, T, F) log-magnitude -> dict(tokens (B, L, D), tokens_pos (B, L, D),
        dense ũ_a (B, D_a, T', F'), feature_map u_a (B, D_a, T', F')), T' = ceil(T/4), F' = ceil(F/4)."""
        return self.audio_pixel_decoder(self.audio_backbone(audio))

    def decode(self, visual: Tuple[torch.Tensor, List[torch.Tensor]], audio: Dict[str, torch.Tensor],
               queries: Optional[torch.Tensor] = None, query_pos: Optional[torch.Tensor] = None,
               query_padding_mask: Optional[torch.Tensor] = None) -> Dict:
        """Run the query decoder. ``queries=None``: the N learnable class-agnostic queries; otherwise
        custom (B, Q, D) queries (with optional (B, Q, D) ``query_pos`` and (B, Q) bool
        ``query_padding_mask``, True = padding). Returns pred_logits (B, Q, C+1), pred_masks
        (B, Q, Hp/4, Wp/4), pred_audio_masks (B, Q, T', F'), query_embeddings (B, Q, D),
        audio_pred_logits (B, Q, C+1), aux_outputs [per-layer dicts] (+ query_padding_mask)."""
        mask_features, multi_scale = visual
        return self.transformer_decoder(multi_scale, mask_features, audio, queries=queries, query_pos=query_pos,
                                        query_padding_mask=query_padding_mask)

    # ------------------------------------------------------------------------------ training pieces
    def weight_losses(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Multiply by ``weight_dict``; losses without a weight are dropped."""
        return {k: v * self.weight_dict[k] for k, v in losses.items() if k in self.weight_dict}

    def class_agnostic_losses(self, outputs: Dict, targets: List[Dict]):
        """ℓ_agn: weighted CE + mask + dice (+ aux) and the final layer's matching
        [(query_idx, target_idx)] per image."""
        if not self.deep_supervision:
            outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        losses, indices = self.criterion(outputs, targets, return_indices=True)
        return self.weight_losses(losses), indices

    @torch.no_grad()
    def observe_assignments(self, outputs: Dict, targets: List[Dict], indices) -> torch.Tensor:
        """Give the class predictor the final-layer embeddings with their matched labels
        (unmatched -> C), step it, set ``last_assignments`` (B, N) on CPU and advance ``_iter``."""
        emb = outputs["query_embeddings"]
        b, n = emb.shape[:2]
        assigned = torch.full((b, n), self.num_classes, dtype=torch.long, device=emb.device)
        for i, (t, (src, tgt)) in enumerate(zip(targets, indices)):
            if len(src):
                assigned[i, src.to(emb.device)] = t["labels"][tgt.to(t["labels"].device)].to(emb.device)
        self.class_predictor.observe(emb.detach().flatten(0, 1), assigned.flatten())
        self.class_predictor.step(int(self._iter))
        self._iter += 1
        self.last_assignments = assigned.cpu()
        return assigned

    # ------------------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[dict]):
        images = self.preprocess_image(batched_inputs)
        audio = self.preprocess_audio(batched_inputs)
        visual = self.encode_visual(images.tensor)
        audio_feats = self.encode_audio(audio)
        outputs = self.decode(visual, audio_feats)

        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            losses, indices = self.class_agnostic_losses(outputs, targets)
            if self.prompting is not None:
                # Before observe_assignments: prompts come from the class predictor of the last
                # iteration (paper: "via the GMM model from the last iteration").
                losses.update(self.prompting(self, batched_inputs, visual, audio_feats, targets))
            self.observe_assignments(outputs, targets, indices)
            return losses

        return self.inference(outputs, batched_inputs, images)

    # ------------------------------------------------------------------------------ inference
    @staticmethod
    def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
        """(Q, C+1) logits, (Q, H, W) mask logits -> (C, H, W) = Σ_q softmax(p_q)[c] σ(m_q) (no-object dropped)."""
        prob = F.softmax(mask_cls, dim=-1)[..., :-1]
        return torch.einsum("qc,qhw->chw", prob, mask_pred.sigmoid())

    def inference(self, outputs: Dict, batched_inputs: List[dict], images: ImageList) -> List[dict]:
        mask_pred = F.interpolate(outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear",
                                  align_corners=False)
        audio_probs = F.softmax(outputs["audio_pred_logits"].float(), dim=-1)[..., :-1].max(1).values
        results = []
        for i, (x, size) in enumerate(zip(batched_inputs, images.image_sizes)):
            height = x.get("height", size[0])
            width = x.get("width", size[1])
            masks = sem_seg_postprocess(mask_pred[i].float(), size, height, width)
            results.append({
                "sem_seg": self.semantic_inference(outputs["pred_logits"][i].float(), masks),
                "audio_class_probs": audio_probs[i],
            })
        return results
