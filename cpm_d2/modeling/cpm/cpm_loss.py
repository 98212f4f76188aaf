"""``CPMLoss``: the class-conditional prompting objectives of CPM (paper §3.2, eqs. 5-9).

The prompt pass (``prompt_pass.py``: prompts z^k for each image's ground-truth classes, decoded
beside the class-agnostic queries, ACP's on the noise-mixed audio) hands its outputs here as a
``PromptBatch``; this module only computes the losses, without reading anything back to the host:

    ACP (eq. 5)    MSE(sigma(sum_k m^a_k), a_i / (a_i + a_j)) on the audio-mask grid T' x F'
    VCP (eq. 6)    the class-agnostic criterion with the fixed assignment prompt k <-> target of
                   class k (every decoder layer), normalised like l_agn (its number of masks); the
                   prompts decoded on the ACP mixture or (VCP.AUDIO "clean") on the clean audio
    PCL (eqs. 7-9) supervised InfoNCE between anchors f(k) (masked average pooling of the audio
                   features u_a under the prompt's binarised audio saliency) and sampled pixels of
                   the pixel features, both through small projection heads

Each term is multiplied by MODEL.CPM.LAMBDA x its WEIGHT (VCP also by the class-agnostic
CLASS/MASK/DICE_WEIGHT) and returned under its own "loss_" key.

Decisions where the paper is silent:
* PCL works on projections (2-layer MLPs to PCL.PROJ_DIM) of u_a and of the mask features u~_v,
  as contrastive methods do: contrasting u~_v itself would pull the very map every class-agnostic
  mask is a dot product with. Negatives (PCL.NEGATIVES): "image" (default) takes an anchor's
  positives and negatives from its own image; "batch" from every image (a silent object of the
  anchor's class in another image is then a negative); docs/results.md compares the two.
  Pixels are L2-normalised (cosine similarity) and drawn class-balanced
  (:func:`~.losses.sample_pixels`).
* VCP's CE is the criterion's weighted mean over the (non-padded) prompts, like l_agn's CE over
  the queries, but over the C classes only: the "no object" logit is left out. A prompt is an
  object by construction; training it to say so pushes the shared no-object decision towards
  "object" for every query (unmatched queries are then called objects at test time; see
  docs/results.md). Its mask and dice sums are divided
  by l_agn's number of masks, so one prompted mask weighs what one matched class-agnostic mask
  weighs.
* Images without sounding classes have no prompts and contribute nothing; every loss still
  exists (a zero attached to the graph), so the set of keys never changes (DDP-safe).
* Inputs are checked where they enter the model (non-negative magnitudes, label ranges), once
  per batch on the host, so nothing here synchronises with the device.
"""
from typing import Dict, List

import torch
from torch import nn
from torch.profiler import record_function

from detectron2.config import configurable

from ..criterion import SetCriterion, build_set_criterion, loss_weight_dict
from .losses import acp_loss, acp_ratio_target, masked_average_pool, pcl_loss, sample_pixel_slots
from .prompt_pass import PromptBatch

__all__ = ["CPMLoss"]


def _without_no_object(logits: torch.Tensor) -> torch.Tensor:
    """(..., C+1) logits with the no-object one pushed out of the softmax (VCP's CE is over the C classes)."""
    return torch.cat([logits[..., :-1], torch.full_like(logits[..., -1:], -1e4)], dim=-1)


def _projection(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


class CPMLoss(nn.Module):
    """forward(prompts: PromptBatch, targets, num_masks, pixel_features) -> Dict[str, Tensor]
    (see the module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        criterion: SetCriterion,
        weight_dict: Dict[str, float],
        num_classes: int,
        loss_lambda: float = 1.0,
        acp_enabled: bool = True,
        acp_weight: float = 1.0,
        vcp_enabled: bool = True,
        vcp_weight: float = 1.0,
        vcp_class_weight: float = 1.0,
        vcp_audio: str = "mixture",
        pcl_enabled: bool = True,
        pcl_weight: float = 1.0,
        pcl_temperature: float = 0.1,
        pcl_num_pixels: int = 1024,
        pcl_negatives: str = "image",
        pixel_dim: int = 256,
        audio_dim: int = 256,
        proj_dim: int = 128,
        ignore_value: int = 255,
    ):
        """
        Args:
            criterion: a SetCriterion (VCP reuses it with fixed assignments; it holds no parameters).
            weight_dict: the class-agnostic loss weights ("loss_ce", ..., "loss_dice_<i>").
            num_classes: C; the label maps hold classes in [0, C) besides ``ignore_value``.
            loss_lambda: lambda of l = l_agn + lambda * l_CPM.
            vcp_audio: "mixture" or "clean", the audio VCP's prompts are decoded with when ACP is on
                (the prompt pass decodes; here it is only reported).
            acp_* / vcp_* / pcl_*: the parts' switches and weights; PCL's tau, pixels per image and
                negative set ("image" or "batch").
            pixel_dim / audio_dim: channels of u~_v (MASK_DIM) and u_a (AUDIO.PIXEL_DECODER_DIM).
            proj_dim: output size of the two PCL projection heads.
            ignore_value: the label maps' ignore / padding value.
        """
        super().__init__()
        if not (acp_enabled or vcp_enabled or pcl_enabled):
            raise ValueError(
                f"MODEL.CPM.ENABLED is True but MODEL.CPM.ACP/VCP/PCL.ENABLED are all False; "
                "set MODEL.CPM.ENABLED False for the class-agnostic model"
            )
        if pcl_enabled and (pcl_temperature <= 0 or pcl_num_pixels < 1):
            raise ValueError(f"MODEL.CPM.PCL.TEMPERATURE must be > 0 and NUM_PIXELS >= 1, got "
                             f"{pcl_temperature} and {pcl_num_pixels}")
        if vcp_audio not in ("mixture", "clean"):
            raise ValueError(f"MODEL.CPM.VCP.AUDIO must be 'mixture' or 'clean', got {vcp_audio!r}")
        if pcl_negatives not in ("image", "batch"):
            raise ValueError(f"MODEL.CPM.PCL.NEGATIVES must be 'image' or 'batch', got {pcl_negatives!r}")
        self.criterion = criterion
        self.weight_dict = dict(weight_dict)
        self.num_classes = int(num_classes)
        self.loss_lambda = float(loss_lambda)
        self.acp_enabled, self.acp_weight = bool(acp_enabled), float(acp_weight)
        self.vcp_enabled, self.vcp_weight = bool(vcp_enabled), float(vcp_weight)
        if vcp_class_weight < 0:
            raise ValueError(f"MODEL.CPM.VCP.CLASS_WEIGHT must be >= 0, got {vcp_class_weight}")
        self.vcp_class_weight = float(vcp_class_weight)
        self.vcp_audio = vcp_audio
        self.pcl_enabled, self.pcl_weight = bool(pcl_enabled), float(pcl_weight)
        self.pcl_temperature = float(pcl_temperature)
        self.pcl_num_pixels = int(pcl_num_pixels)
        self.pcl_negatives = pcl_negatives
        self.ignore_value = int(ignore_value)
        if self.pcl_enabled:
            self.pcl_pixel_proj = _projection(pixel_dim, proj_dim)
            self.pcl_audio_proj = _projection(audio_dim, proj_dim)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CPM
        return {
            "criterion": build_set_criterion(cfg),
            "weight_dict": loss_weight_dict(cfg),
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "loss_lambda": c.LAMBDA,
            "acp_enabled": c.ACP.ENABLED,
            "acp_weight": c.ACP.WEIGHT,
            "vcp_enabled": c.VCP.ENABLED,
            "vcp_weight": c.VCP.WEIGHT,
            "vcp_class_weight": c.VCP.CLASS_WEIGHT,
            "vcp_audio": c.VCP.AUDIO,
            "pcl_enabled": c.PCL.ENABLED,
            "pcl_weight": c.PCL.WEIGHT,
            "pcl_temperature": c.PCL.TEMPERATURE,
            "pcl_num_pixels": c.PCL.NUM_PIXELS,
            "pcl_negatives": c.PCL.NEGATIVES,
            "pixel_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "audio_dim": cfg.MODEL.AUDIO.PIXEL_DECODER_DIM,
            "proj_dim": c.PCL.PROJ_DIM,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    def extra_repr(self):
        parts = [f"{n}(weight={w})" for n, on, w in (("ACP", self.acp_enabled, self.acp_weight),
                                                   ("VCP", self.vcp_enabled, self.vcp_weight),
                                                   ("PCL", self.pcl_enabled, self.pcl_weight)) if on]
        return (f"lambda={self.loss_lambda}, {', '.join(parts)}, vcp_audio={self.vcp_audio}, "
                f"pcl_negatives={self.pcl_negatives}")

    def _scale(self, weight: float) -> float:
        return self.loss_lambda * weight

    # ------------------------------------------------------------------------------ the three parts
    @record_function("cpm.acp_loss")
    def acp(self, prompts: PromptBatch) -> torch.Tensor:
        """Eq. 5 on the final prediction's audio masks of the prompts that heard a_p."""
        audio_masks = prompts.outputs["pred_audio_masks"]
        # the magnitudes were checked non-negative where they entered the model
        target = acp_ratio_target(prompts.clean_audio, prompts.noise_audio, audio_masks.shape[-2:], check_sign=False)
        return acp_loss(audio_masks, prompts.valid, target) * self._scale(self.acp_weight)

    @record_function("cpm.vcp_loss")
    def vcp(self, prompts: PromptBatch, targets, num_masks) -> Dict[str, torch.Tensor]:
        """Eq. 6: the criterion with prompt k <-> the target of class k (final and aux predictions)."""
        outputs = prompts.vcp_outputs
        outputs = dict(outputs, pred_logits=_without_no_object(outputs["pred_logits"]),
                       aux_outputs=[dict(a, pred_logits=_without_no_object(a["pred_logits"]))
                                    for a in outputs.get("aux_outputs", [])])
        raw = self.criterion(outputs, targets, indices=prompts.vcp_indices, num_masks=num_masks)
        s = self._scale(self.vcp_weight)
        return {"loss_vcp_" + k[len("loss_"):]: v * self.weight_dict[k] * s * (self.vcp_class_weight if
                k.startswith("loss_ce") else 1.0) for k, v in raw.items() if k in self.weight_dict}

    @record_function("cpm.pcl_loss")
    def pcl(self, prompts: PromptBatch, targets, pixel_features) -> torch.Tensor:
        """Eqs. 7-9: projected anchors f(k) pooled from u_a vs projected pixels of u~_v."""
        if any("sem_seg" not in t for t in targets):
            raise ValueError("PCL (MODEL.CPM.PCL.ENABLED) needs every training input to carry 'sem_seg' (the "
                             "pixel labels); the mapper adds it")
        pooled = masked_average_pool(prompts.outputs["pred_audio_masks"], prompts.audio_features)  # (B, K, D_a)
        anchors = self.pcl_audio_proj(pooled[prompts.image_index, prompts.slot_index])  # (A, P_dim)
        sem_seg = torch.stack([t["sem_seg"] for t in targets])
        feats, labels, images, valid = sample_pixel_slots(pixel_features, sem_seg, self.pcl_num_pixels,
                                                          self.num_classes, ignore_value=self.ignore_value)
        pixels = self.pcl_pixel_proj(feats)
        same = self.pcl_negatives == "image"
        loss = pcl_loss(anchors, prompts.labels, pixels, labels, temperature=self.pcl_temperature,
                        anchor_images=prompts.image_index if same else None, pixel_images=images if same else None,
                        pixel_valid=valid)
        return loss * self._scale(self.pcl_weight)

    @record_function("cpm.prompt_losses")
    def forward(self, prompts: PromptBatch, targets: List[Dict[str, torch.Tensor]], num_masks,
                pixel_features: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            prompts: the step's prompt pass (``PromptBatch``: the prompts' decoder outputs, labels,
                validity and indices, the audio features and magnitudes they heard).
            targets: the class-agnostic targets (per image "labels", "masks", "sem_seg").
            num_masks: l_agn's mask normaliser.
            pixel_features: u~_v (B, MASK_DIM, H/4, W/4).
        """
        losses = {}
        if self.acp_enabled:
            if prompts.clean_audio is None or prompts.noise_audio is None:
                raise ValueError(f"ACP needs the clean and noise magnitudes")
            losses["loss_acp"] = self.acp(prompts)
        if self.vcp_enabled:
            losses.update(self.vcp(prompts, targets, num_masks))
        if self.pcl_enabled:
            losses["loss_pcl"] = self.pcl(prompts, targets, pixel_features)
        return losses
