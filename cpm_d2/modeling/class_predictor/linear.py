"""Softmax classifier over mask embeddings (Mask2Former's class head; with CPM, the paper's "Point Rep.")."""
import torch
from torch import nn
from torch.profiler import record_function

from detectron2.config import configurable

from .base import CLASS_PREDICTOR_REGISTRY, ClassPredictor

__all__ = ["LinearClassPredictor"]


@CLASS_PREDICTOR_REGISTRY.register()
class LinearClassPredictor(ClassPredictor):
    """logits = W q̃ + b, (..., D) -> (..., C+1); softmax gives p(c | q̃), index C = no object.

    With ``prompt_embedding=True`` (built so when MODEL.CPM.ENABLED) it also holds the paper's
    "Point Rep." prompts (Table 5): a learnable (C+1) x D embedding, one vector per label;
    ``sample(labels)`` returns its rows, with gradient, so the prompting losses train it.
    """

    @configurable
    def __init__(self, *, num_classes: int, embed_dim: int, prompt_embedding: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.linear = nn.Linear(embed_dim, num_classes + 1)
        self.can_sample = bool(prompt_embedding)
        if self.can_sample:
            self.prompts = nn.Embedding(num_classes + 1, embed_dim)

    @classmethod
    def from_config(cls, cfg, num_classes, embed_dim):
        return {"num_classes": num_classes, "embed_dim": embed_dim, "prompt_embedding": cfg.MODEL.CPM.ENABLED}

    @record_function("cpm.class_head")
    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear(embeddings)

    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (K,) -> the learnable prompts (K, D) of those labels."""
        if not self.can_sample:
            return super().sample(labels)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(f"linear.py: sample labels must lie in [0, {self.num_classes}]")
        return self.prompts(labels.to(self.prompts.weight.device).long())
