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

from .decoder_predictions import decoder_predictions

__all__ = ["SetCriterion", "build_set_criterion", "loss_weight_dict", "sigmoid_focal_loss", "sigmoid_ce_loss",
           "dice_loss", "calculate_uncertainty"]


def _focal_per_mask(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1)


def _ce_per_mask(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1)


def _dice_per_mask(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    s = inputs.sigmoid()
    num = 2 * (s * targets).sum(-1)
    den = s.sum(-1) + targets.sum(-1)
    return 1 - (num + 1) / (den + 1)


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """inputs/targets (M, P): mean over points of alpha_t (1 - p_t)^gamma BCE, summed over masks / num_masks.

    p_t = sigmoid(x) for target 1 and 1 - sigmoid(x) for target 0; alpha_t = alpha for 1, 1 - alpha
    for 0 (alpha < 0 disables the weighting).
    """
    return _focal_per_mask(inputs, targets, alpha, gamma).sum() / num_masks


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """inputs/targets (M, P): mean per-point BCE, summed over masks / num_masks."""
    return _ce_per_mask(inputs, targets).sum() / num_masks


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """inputs (M, P) logits, targets (M, P): sum of 1 - (2 sum(s g) + 1) / (sum(s) + sum(g) + 1), / num_masks."""
    return _dice_per_mask(inputs, targets).sum() / num_masks


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
            raise ValueError(f"MODEL.MASK_FORMER.MASK_LOSS must be 'focal' or 'bce', got {mask_loss!r}")
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

    def _label_losses(self, predictions: List[Dict], pairs: List["_Pairs"]) -> torch.Tensor:
        """(L,) the CE of each prediction: F.cross_entropy's class-weighted mean over the queries not
        padded, for all predictions in one call and without a host check (0, in the graph, where
        every query is padding)."""
        logits = torch.stack([p["pred_logits"].float() for p in predictions])  # (L, B, Q, C+1)
        n, b, q = logits.shape[:3]
        target = torch.full((n, b, q), self.num_classes, dtype=torch.long, device=logits.device)
        layer = torch.cat([torch.full_like(pr.image, i) for i, pr in enumerate(pairs)])
        target[layer, torch.cat([pr.image for pr in pairs]), torch.cat([pr.query for pr in pairs])] = torch.cat(
            [pr.labels for pr in pairs]).to(logits.device)
        pads = [p.get("query_padding_mask") for p in predictions]
        if any(pad is not None for pad in pads):
            pad = torch.stack([torch.zeros(b, q, dtype=torch.bool, device=logits.device) if m is None
                               else m.to(logits.device, torch.bool) for m in pads])
            target = target.masked_fill(pad, -100)
        weight = self.empty_weight.to(logits)
        per_query = F.cross_entropy(logits.flatten(0, 1).transpose(1, 2), target.flatten(0, 1), weight,
                                    ignore_index=-100, reduction="none")  # weight[target] * nll, 0 where ignored
        total = (weight[target.clamp_min(0)] * (target != -100)).flatten(1).sum(1)
        return per_query.reshape(n, -1).sum(1) / total.clamp_min(torch.finfo(total.dtype).tiny)

    def _mask_losses(self, predictions: List[Dict], pairs: List["_Pairs"], num_masks):
        """(mask losses, dice losses), one per prediction: the matched masks of all predictions
        sampled at their uncertain points in one go."""
        counts = [int(pr.query.numel()) for pr in pairs]
        zeros = [p["pred_masks"].sum() * 0.0 for p, m in zip(predictions, counts) if m == 0]
        if not sum(counts):
            return zeros, [z.clone() for z in zeros]
        src = torch.cat([p["pred_masks"][pr.image, pr.query] for p, pr in zip(predictions, pairs)])[:, None].float()
        tgt = torch.cat([pr.masks for pr in pairs]).to(device=src.device, dtype=torch.float32)[:, None]
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src, calculate_uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio)
            point_labels = point_sample(tgt, coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src, coords, align_corners=False).squeeze(1)
        if self.mask_loss == "focal":
            per_mask = _focal_per_mask(point_logits, point_labels, self.focal_alpha, self.focal_gamma)
        else:
            per_mask = _ce_per_mask(point_logits, point_labels)
        dice = _dice_per_mask(point_logits, point_labels)
        masks, dices = [], []
        for m, part, d in zip(counts, per_mask.split(counts), dice.split(counts)):
            if m == 0:
                z = zeros.pop(0)
                masks.append(z)
                dices.append(z.clone())
            else:
                masks.append(part.sum() / num_masks)
                dices.append(d.sum() / num_masks)
        return masks, dices

    def _pairs_of(self, indices, targets, device, pairs):
        return pairs if pairs is not None else self._pairs(indices, targets, device,
                                                           self._flat_targets(targets, device))

    def loss_labels(self, outputs, targets, indices, num_masks, pairs=None) -> Dict[str, torch.Tensor]:
        pairs = self._pairs_of(indices, targets, outputs["pred_logits"].device, pairs)
        return {"loss_ce": self._label_losses([outputs], [pairs])[0]}

    def loss_masks(self, outputs, targets, indices, num_masks, pairs=None) -> Dict[str, torch.Tensor]:
        pairs = self._pairs_of(indices, targets, outputs["pred_masks"].device, pairs)
        (mask,), (dice,) = self._mask_losses([outputs], [pairs], num_masks)
        return {"loss_mask": mask, "loss_dice": dice}

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

    def _losses(self, predictions, pairs, num_masks) -> List[Dict[str, torch.Tensor]]:
        """loss_ce, loss_mask, loss_dice of every prediction, each loss computed for all at once."""
        ce = self._label_losses(predictions, pairs)
        masks, dices = self._mask_losses(predictions, pairs, num_masks)
        return [{"loss_ce": c, "loss_mask": m, "loss_dice": d} for c, m, d in zip(ce.unbind(0), masks, dices)]

    def forward(self, outputs: Dict, targets: List[Dict],
                indices: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None,
                return_indices: bool = False, num_masks=None):
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]}")
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
        per_prediction = self._losses(aux + [main], pairs, num_masks)
        losses = per_prediction[-1]
        for i, layer in enumerate(per_prediction[:-1]):
            losses.update({f"{k}_{i}": v for k, v in layer.items()})
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


def loss_weight_dict(cfg) -> Dict[str, float]:
    """{"loss_ce": CLASS_WEIGHT, "loss_mask": MASK_WEIGHT, "loss_dice": DICE_WEIGHT} and, with
    DEEP_SUPERVISION, the same for "<key>_<i>" of every auxiliary prediction i."""
    mf = cfg.MODEL.MASK_FORMER
    base = {"loss_ce": mf.CLASS_WEIGHT, "loss_mask": mf.MASK_WEIGHT, "loss_dice": mf.DICE_WEIGHT}
    weights = dict(base)
    if mf.DEEP_SUPERVISION:
        for i in range(decoder_predictions(cfg) - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    return weights
