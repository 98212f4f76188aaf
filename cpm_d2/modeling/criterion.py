"""Set criterion of the class-agnostic path (Mask2Former's SetCriterion, audio-visual flavour).

Losses (all unweighted here; the meta-architecture applies CLASS/MASK/DICE_WEIGHT):
    loss_ce   cross-entropy over C+1 classes for every query; unmatched queries target "no
              object" (index C), whose class weight is NO_OBJECT_WEIGHT; padded queries
              (outputs["query_padding_mask"]) are ignored. Mean over the (weighted) queries.
    loss_mask sigmoid focal loss ("focal") or sigmoid BCE ("bce") of each matched mask, averaged
              over P points chosen by PointRend uncertainty sampling, summed over masks and
              divided by num_masks.
    loss_dice 1 - (2 sum(s g) + 1) / (sum(s) + sum(g) + 1) on the same points, summed / num_masks.
num_masks is the number of target masks in the batch, averaged over ranks (all-reduced) and
clamped to >= 1. Auxiliary outputs get the same losses with suffix "_<layer index>". All
predictions are matched in one matcher call; the losses read nothing back from the device.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.utils import comm

from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

__all__ = ["SetCriterion", "build_set_criterion", "loss_weight_dict", "sigmoid_focal_loss", "sigmoid_ce_loss",
           "dice_loss", "calculate_uncertainty"]


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """inputs/targets (M, P): mean over points of alpha_t (1 - p_t)^gamma BCE, summed over masks / num_masks.

    p_t = sigmoid(x) for target 1 and 1 - sigmoid(x) for target 0; alpha_t = alpha for 1, 1 - alpha
    for 0 (alpha < 0 disables the weighting).
    """
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_masks


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """inputs/targets (M, P): mean per-point BCE, summed over masks / num_masks."""
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1).sum() / num_masks


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """inputs (M, P) logits, targets (M, P): sum of 1 - (2 sum(s g) + 1) / (sum(s) + sum(g) + 1), / num_masks."""
    s = inputs.sigmoid()
    num = 2 * (s * targets).sum(-1)
    den = s.sum(-1) + targets.sum(-1)
    return (1 - (num + 1) / (den + 1)).sum() / num_masks


class _Pairs(NamedTuple):
    """Matched (query, target) pairs over a batch: image, query (M,), target labels (M,), masks (M, H, W)."""
    image: torch.Tensor
    query: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of (R, 1, ...) mask logits = -|logit| (highest at the decision boundary)."""
    return -torch.abs(logits)


class SetCriterion(nn.Module):
    """forward(outputs, targets, indices=None, return_indices=False) -> losses [, final-layer indices].

    outputs: the decoder dict ("pred_logits" (B, Q, C+1), "pred_masks" (B, Q, h, w), optional
        "aux_outputs" list, optional "query_padding_mask" (B, Q)).
    targets: per image {"labels" (K,) int64, "masks" (K, H, W)}; K may be 0.
    indices: optional per image (query_idx, target_idx): skip matching and use these pairs for the
        final layer AND every aux layer (used for class-conditional prompts, which are tied to their
        target by construction).
    return_indices: also return the matching of every prediction, [aux_0, ..., aux_n-1, final]
        (each a per-image list of (query_idx, target_idx)), and the mask normaliser.
    num_masks: optional normaliser of the mask losses (default: this batch's target masks,
        averaged over ranks); CPM's VCP passes the class-agnostic pass's, so a prompted mask
        weighs what a matched class-agnostic mask weighs.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, eos_coef: float, num_points: int,
                 oversample_ratio: float, importance_sample_ratio: float, mask_loss: str = "focal",
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if mask_loss not in ("focal", "bce"):
            raise ValueError(f"criterion.py: MODEL.MASK_FORMER.MASK_LOSS must be 'focal' or 'bce', got {mask_loss!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = eos_coef
        weight = torch.ones(num_classes + 1)
        weight[-1] = eos_coef
        self.register_buffer("empty_weight", weight, persistent=False)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.mask_loss = mask_loss
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _flat_targets(targets, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every target of the batch concatenated: labels (T,) and masks (T, H, W) on ``device``."""
        labels = torch.cat([t["labels"] for t in targets]).to(device)
        masks = torch.cat([t["masks"] for t in targets]).to(device)
        return labels, masks

    @staticmethod
    def _pairs(indices, targets, device, flat_targets) -> "_Pairs":
        """The (query, target) pairs of ``indices`` over the batch: image / query index and target
        label / mask of each, from one copy of the indices to ``device`` (they come from the host)."""
        offsets = [0]
        for t in targets:
            offsets.append(offsets[-1] + len(t["labels"]))
        parts = [torch.stack([torch.full_like(src, i), src, tgt + offsets[i]]).long()
                 for i, (src, tgt) in enumerate(indices)]
        if len({p.device for p in parts}) > 1:
            parts = [p.to(device) for p in parts]
        flat = torch.cat(parts, dim=1).to(device) if parts else torch.zeros(3, 0, dtype=torch.long, device=device)
        labels, masks = flat_targets
        return _Pairs(flat[0], flat[1], labels[flat[2]], masks[flat[2]])

    def _cross_entropy(self, logits: torch.Tensor, target_classes: torch.Tensor) -> torch.Tensor:
        """F.cross_entropy's class-weighted mean over the queries not ignored (-100), computed
        without a host check: 0 (in the graph) when every query is ignored."""
        weight = self.empty_weight.to(logits)
        per_query = F.cross_entropy(logits.transpose(1, 2), target_classes, weight, ignore_index=-100,
                                    reduction="none")  # weight[target] * nll, 0 where ignored
        total = (weight[target_classes.clamp_min(0)] * (target_classes != -100)).sum()
        return per_query.sum() / total.clamp_min(torch.finfo(total.dtype).tiny)

    def loss_labels(self, outputs, targets, indices, num_masks, pairs=None) -> Dict[str, torch.Tensor]:
        logits = outputs["pred_logits"].float()
        b, q = logits.shape[:2]
        if pairs is None:
            pairs = self._pairs(indices, targets, logits.device, self._flat_targets(targets, logits.device))
        target_classes = torch.full((b, q), self.num_classes, dtype=torch.long, device=logits.device)
        target_classes[pairs.image, pairs.query] = pairs.labels.to(logits.device)
        pad = outputs.get("query_padding_mask")
        if pad is not None:
            target_classes = target_classes.masked_fill(pad.to(logits.device, torch.bool), -100)
        return {"loss_ce": self._cross_entropy(logits, target_classes)}

    def loss_masks(self, outputs, targets, indices, num_masks, pairs=None) -> Dict[str, torch.Tensor]:
        pred = outputs["pred_masks"]
        if pairs is None:
            pairs = self._pairs(indices, targets, pred.device, self._flat_targets(targets, pred.device))
        if pairs.query.numel() == 0:
            zero = pred.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        src_masks = pred[pairs.image, pairs.query][:, None].float()  # (M, 1, h, w)
        tgt_masks = pairs.masks.to(device=pred.device, dtype=torch.float32)[:, None]  # (M, 1, H, W)
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src_masks, calculate_uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio)
            point_labels = point_sample(tgt_masks, coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src_masks, coords, align_corners=False).squeeze(1)
        if self.mask_loss == "focal":
            lm = sigmoid_focal_loss(point_logits, point_labels, num_masks, self.focal_alpha, self.focal_gamma)
        else:
            lm = sigmoid_ce_loss(point_logits, point_labels, num_masks)
        return {"loss_mask": lm, "loss_dice": dice_loss(point_logits, point_labels, num_masks)}

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def num_masks(targets, device):
        """Target masks per rank, averaged over ranks, >= 1: a float on one process (counted from
        the targets' shapes), a 0-dim tensor on ``device`` under torch.distributed (never read
        back to the host)."""
        n = float(sum(len(t["labels"]) for t in targets))
        if comm.get_world_size() == 1:
            return max(n, 1.0)
        total = torch.as_tensor([n], device=device)
        torch.distributed.all_reduce(total)
        return torch.clamp(total[0] / comm.get_world_size(), min=1)

    def _layer_losses(self, outputs, targets, pairs, num_masks):
        losses = self.loss_labels(outputs, targets, None, num_masks, pairs)
        losses.update(self.loss_masks(outputs, targets, None, num_masks, pairs))
        return losses

    def forward(self, outputs: Dict, targets: List[Dict],
                indices: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None,
                return_indices: bool = False, num_masks=None):
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"criterion.py: {len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]}")
        device = outputs["pred_logits"].device
        pad = outputs.get("query_padding_mask")
        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        aux = [a if pad is None or "query_padding_mask" in a else dict(a, query_padding_mask=pad)
               for a in outputs.get("aux_outputs", [])]
        if num_masks is None:
            num_masks = self.num_masks(targets, device)
        flat_targets = self._flat_targets(targets, device)
        if indices is not None:  # fixed: the same pairs for every prediction
            matched = [list(indices)] * (len(aux) + 1)
            pairs = [self._pairs(indices, targets, device, flat_targets)] * (len(aux) + 1)
        else:  # every prediction matched in one call (one device->host copy of the costs)
            matched = self.matcher.match_all(aux + [main], targets)
            pairs = [self._pairs(m, targets, device, flat_targets) for m in matched]
        losses = self._layer_losses(main, targets, pairs[-1], num_masks)
        for i, a in enumerate(aux):
            losses.update({f"{k}_{i}": v for k, v in self._layer_losses(a, targets, pairs[i], num_masks).items()})
        if return_indices:
            return losses, matched, num_masks
        return losses

    def __repr__(self):
        return (f"SetCriterion(num_classes={self.num_classes}, eos_coef={self.eos_coef}, mask_loss={self.mask_loss}, "
                f"num_points={self.num_points}, matcher={self.matcher!r})")


def build_set_criterion(cfg) -> SetCriterion:
    """The Hungarian matcher + SetCriterion of ``cfg.MODEL.MASK_FORMER`` (Mask2Former's settings)."""
    from .matcher import HungarianMatcher

    mf = cfg.MODEL.MASK_FORMER
    matcher = HungarianMatcher(
        cost_class=mf.CLASS_WEIGHT, cost_mask=mf.MASK_WEIGHT, cost_dice=mf.DICE_WEIGHT,
        num_points=mf.TRAIN_NUM_POINTS, mask_cost="focal" if mf.MASK_LOSS == "focal" else "bce",
        focal_alpha=mf.FOCAL_ALPHA, focal_gamma=mf.FOCAL_GAMMA,
    )
    return SetCriterion(
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, matcher, eos_coef=mf.NO_OBJECT_WEIGHT,
        num_points=mf.TRAIN_NUM_POINTS, oversample_ratio=mf.OVERSAMPLE_RATIO,
        importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO, mask_loss=mf.MASK_LOSS,
        focal_alpha=mf.FOCAL_ALPHA, focal_gamma=mf.FOCAL_GAMMA,
    )


def num_predictions(cfg) -> int:
    """Predictions per decoder pass: one per audio layer (or one of the raw queries) + one per
    masked-attention layer (MASK_FORMER.DEC_LAYERS - 1 of them, Mask2Former's count)."""
    mf = cfg.MODEL.MASK_FORMER
    return max(mf.AUDIO_DEC_LAYERS, 1) + mf.DEC_LAYERS - 1


def loss_weight_dict(cfg) -> Dict[str, float]:
    """{"loss_ce": CLASS_WEIGHT, "loss_mask": MASK_WEIGHT, "loss_dice": DICE_WEIGHT} and, with
    DEEP_SUPERVISION, the same for "<key>_<i>" of every auxiliary prediction i."""
    mf = cfg.MODEL.MASK_FORMER
    base = {"loss_ce": mf.CLASS_WEIGHT, "loss_mask": mf.MASK_WEIGHT, "loss_dice": mf.DICE_WEIGHT}
    weights = dict(base)
    if mf.DEEP_SUPERVISION:
        for i in range(num_predictions(cfg) - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    return weights
