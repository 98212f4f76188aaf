"""Hungarian matching between predicted (class, mask) pairs and ground-truth masks.

cost(i, j) = w_class * (-p_i(c_j)) + w_mask * mask_cost(m_i, g_j) + w_dice * dice(m_i, g_j)
The mask costs are averaged over P points sampled uniformly at random per image (the same points
for every query and target of that image, Mask2Former's way of bounding memory). mask_cost is
the per-point sigmoid cross-entropy ("bce") or sigmoid focal loss ("focal").
All cost matrices of a batch are built in one batched pass (targets padded to K_max), moved to
the CPU once (``match_all``: once for every prediction of a decoder pass), and solved per image
with scipy's linear_sum_assignment.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.profiler import record_function

from detectron2.projects.point_rend.point_features import point_sample

__all__ = ["HungarianMatcher", "batch_dice_cost", "batch_sigmoid_ce_cost", "batch_sigmoid_focal_cost"]


def _dice_cost(prob: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    num = 2 * torch.einsum("bqp,bkp->bqk", prob, targets)
    den = prob.sum(-1)[:, :, None] + targets.sum(-1)[:, None, :]
    return 1 - (num + 1) / (den + 1)


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs (B, Q, P) logits, targets (B, K, P) in [0, 1] -> (B, Q, K) = 1 - (2|m g| + 1) / (|m| + |g| + 1)."""
    return _dice_cost(inputs.sigmoid(), targets)


def _pairwise_point_mean(pos: torch.Tensor, neg: torch.Tensor, targets: torch.Tensor, w_pos: float = 1.0,
                         w_neg: float = 1.0) -> torch.Tensor:
    """mean_p [w_pos pos t + w_neg neg (1 - t)] of every (query, target) pair: (B, Q, P) x2, (B, K, P) -> (B, Q, K).

    Linear in t, so it is w_pos (pos - (w_neg / w_pos) neg) . t + w_neg sum(neg): one fused pass over
    (B, Q, P), one batched matmul, and no (1 - t) tensor.
    """
    if w_pos != 0:
        cross = w_pos * torch.einsum("bqp,bkp->bqk", torch.add(pos, neg, alpha=-w_neg / w_pos), targets)
    else:
        cross = -w_neg * torch.einsum("bqp,bkp->bqk", neg, targets)
    return (cross + w_neg * neg.sum(-1)[:, :, None]) / pos.shape[-1]


def batch_sigmoid_ce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean per-point binary cross-entropy of every (query, target) pair: (B, Q, P), (B, K, P) -> (B, Q, K)."""
    neg = F.softplus(inputs)  # BCE(x, 0) = -log(1 - sigmoid(x))
    pos = neg - inputs  # BCE(x, 1) = -log(sigmoid(x)) = softplus(x) - x
    return _pairwise_point_mean(pos, neg, targets)


def _focal_cost(inputs: torch.Tensor, prob: torch.Tensor, targets: torch.Tensor, alpha: float,
                gamma: float) -> torch.Tensor:
    neg_ce = F.softplus(inputs)  # BCE(x, 0); BCE(x, 1) = softplus(x) - x, so one softplus serves both
    pos = (neg_ce - inputs).mul_((1 - prob).pow_(gamma))  # (1 - p)^gamma BCE(x, 1)
    neg = neg_ce.mul_(prob.pow(gamma))  # p^gamma BCE(x, 0)
    w_pos, w_neg = (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)
    return _pairwise_point_mean(pos, neg, targets, w_pos, w_neg)


def batch_sigmoid_focal_cost(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                             gamma: float = 2.0) -> torch.Tensor:
    """Mean per-point sigmoid focal loss of every (query, target) pair: -> (B, Q, K)."""
    return _focal_cost(inputs, inputs.sigmoid(), targets, alpha, gamma)


class HungarianMatcher(nn.Module):
    """forward(outputs, targets) -> [(query_idx int64 (k,), target_idx int64 (k,))] per image,
    k = min(Q, K_b); query_idx ascending. Images without targets get two empty tensors.

    outputs: "pred_logits" (B, Q, C+1), "pred_masks" (B, Q, h, w); optional "query_padding_mask"
        (B, Q) True = padded query, never matched.
    targets: per image {"labels": (K,) int64, "masks": (K, H, W) bool/float}.
    """

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0,
                 num_points: int = 12544, mask_cost: str = "bce", focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0):
        super().__init__()
        if mask_cost not in ("bce", "focal"):
            raise ValueError(f"mask cost (MODEL.MASK_FORMER.MASK_LOSS) must be 'bce' or 'focal', got {mask_cost!r}")
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0: set at least one of MODEL.MASK_FORMER.CLASS_WEIGHT, "
                             "MASK_WEIGHT, DICE_WEIGHT above 0")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points
        self.mask_cost = mask_cost
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def cost_matrices(self, outputs: Dict, targets: List[Dict]) -> torch.Tensor:
        """(B, Q, K_max) float32 costs; columns >= K_b of image b are padding (+inf)."""
        logits = outputs["pred_logits"].float()
        pred_masks = outputs["pred_masks"].float()
        b, q = logits.shape[:2]
        sizes = [len(t["labels"]) for t in targets]
        k_max = max(sizes) if sizes else 0
        device = logits.device
        if k_max == 0:
            return torch.zeros(b, q, 0, device=device)
        labels = torch.zeros(b, k_max, dtype=torch.long, device=device)
        tgt_points = torch.zeros(b, k_max, self.num_points, device=device)
        coords = torch.rand(b, self.num_points, 2, device=device)
        for i, t in enumerate(targets):
            if sizes[i] == 0:
                continue
            labels[i, : sizes[i]] = t["labels"].to(device)
            tgt = t["masks"].to(device=device, dtype=torch.float32)[:, None]
            tgt_points[i, : sizes[i]] = point_sample(tgt, coords[i : i + 1].expand(sizes[i], -1, -1),
                                                     align_corners=False).squeeze(1)
        pred_points = point_sample(pred_masks, coords, align_corners=False)  # (B, Q, P)
        prob = logits.softmax(-1)
        cost = -self.cost_class * torch.gather(prob, 2, labels[:, None, :].expand(-1, q, -1))
        pred_prob = pred_points.sigmoid()  # shared by the focal and dice costs
        if self.cost_mask:
            if self.mask_cost == "focal":
                mc = _focal_cost(pred_points, pred_prob, tgt_points, self.focal_alpha, self.focal_gamma)
            else:
                mc = batch_sigmoid_ce_cost(pred_points, tgt_points)
            cost = cost + self.cost_mask * mc
        if self.cost_dice:
            cost = cost + self.cost_dice * _dice_cost(pred_prob, tgt_points)
        pad_k = torch.arange(k_max, device=device)[None, :] >= torch.tensor(sizes, device=device)[:, None]
        cost = cost.masked_fill(pad_k[:, None, :], float("inf"))
        pad_q = outputs.get("query_padding_mask")
        if pad_q is not None:
            cost = cost.masked_fill(pad_q.to(device=device, dtype=torch.bool)[:, :, None], float("inf"))
        return cost

    def forward(self, outputs: Dict, targets: List[Dict]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        return self.match_all([outputs], targets)[0]

    @torch.no_grad()
    @record_function("cpm.matcher")
    def match_all(self, predictions: List[Dict], targets: List[Dict]) -> List[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """``forward`` for several predictions of one batch (a decoder's layers): their cost matrices
        are copied to the host in one go (one device->host sync for all of them)."""
        for outputs in predictions:
            if len(targets) != outputs["pred_logits"].shape[0]:
                raise ValueError(f"{len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]}")
        costs = torch.stack([self.cost_matrices(o, targets) for o in predictions]).cpu().numpy()  # (L, B, Q, K_max)
        pads = [o.get("query_padding_mask") for o in predictions]
        if any(p is not None for p in pads):
            host = torch.stack([torch.zeros(o["pred_logits"].shape[:2], dtype=torch.bool, device=o["pred_logits"].device)
                                if p is None else p.to(torch.bool) for o, p in zip(predictions, pads)]).cpu()
        out = []
        for layer, (cost, pad_q) in enumerate(zip(costs, pads)):
            indices = []
            for i, t in enumerate(targets):
                k = len(t["labels"])
                c = cost[i, :, :k]
                rows = torch.arange(c.shape[0])
                if pad_q is not None:
                    rows = rows[~host[layer, i]]
                    c = c[rows.numpy()]
                if k == 0 or c.shape[0] == 0:
                    indices.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)))
                    continue
                r, col = linear_sum_assignment(c)
                indices.append((rows[torch.as_tensor(r, dtype=torch.int64)], torch.as_tensor(col, dtype=torch.int64)))
            out.append(indices)
        return out

    def __repr__(self):
        return (f"HungarianMatcher(cost_class={self.cost_class}, cost_mask={self.cost_mask} ({self.mask_cost}), "
                f"cost_dice={self.cost_dice}, num_points={self.num_points})")
