"""Softmax classifier over mask embeddings (Mask2Former's class head; the paper's "Point Rep.")."""
import torch
from torch import nn

from detectron2.config import configurable

from .base import CLASS_PREDICTOR_REGISTRY, ClassPredictor

__all__ = ["LinearClassPredictor"]


@CLASS_PREDICTOR_REGISTRY.register()
class LinearClassPredictor(ClassPredictor):
    """logits = W q̃ + b, (..., D) -> (..., C+1); softmax gives p(c | q̃), index C = no object.

    For the "Point Rep." ablation it also keeps one prototype per label (C classes + no-object):
    an exponential moving average of the embeddings ``observe`` receives,
    ``proto_c <- m * proto_c + (1 - m) * mean(embeddings with label c)`` with
    m = MODEL.CPM.GMM.MOMENTUM (the same blending constant the GMM uses); the first observation
    of a label sets its prototype directly. ``sample(labels)`` returns those prototypes (zeros for a
    label never observed). Under torch.distributed the per-label sums and counts are all-reduced,
    so the buffers stay identical on every rank.
    """

    can_sample = True

    @configurable
    def __init__(self, *, num_classes: int, embed_dim: int, momentum: float = 0.9):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"linear.py: prototype momentum must be in [0, 1), got {momentum}")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.momentum = momentum
        self.linear = nn.Linear(embed_dim, num_classes + 1)
        self.register_buffer("prototypes", torch.zeros(num_classes + 1, embed_dim))
        self.register_buffer("prototype_seen", torch.zeros(num_classes + 1, dtype=torch.bool))

    @classmethod
    def from_config(cls, cfg, num_classes, embed_dim):
        return {"num_classes": num_classes, "embed_dim": embed_dim, "momentum": cfg.MODEL.CPM.GMM.MOMENTUM}

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear(embeddings)

    @torch.no_grad()
    def observe(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim or labels.shape != embeddings.shape[:1]:
            raise ValueError(f"linear.py: observe expects embeddings (K, {self.embed_dim}) and labels (K,), got "
                             f"{tuple(embeddings.shape)} and {tuple(labels.shape)}")
        labels = labels.to(device=self.prototypes.device, dtype=torch.long)
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"linear.py: labels must lie in [0, {self.num_classes}]")
        emb = embeddings.detach().to(self.prototypes)
        sums = torch.zeros_like(self.prototypes).index_add_(0, labels, emb)
        counts = torch.zeros(self.num_classes + 1, device=sums.device, dtype=sums.dtype)
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=sums.dtype))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        present = counts > 0
        if not present.any():
            return
        means = sums[present] / counts[present, None]
        old = self.prototypes[present]
        seen = self.prototype_seen[present, None]
        self.prototypes[present] = torch.where(seen, self.momentum * old + (1 - self.momentum) * means, means)
        self.prototype_seen |= present

    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(device=self.prototypes.device, dtype=torch.long)
        return self.prototypes[labels].clone()
