"""Softmax classifier over mask embeddings (Mask2Former's class head), with CPM's prompts."""
import torch
from torch import nn
from torch.profiler import record_function

from detectron2.config import configurable

from .base import CLASS_PREDICTOR_REGISTRY, ClassPredictor

__all__ = ["LinearClassPredictor"]


@CLASS_PREDICTOR_REGISTRY.register()
class LinearClassPredictor(ClassPredictor):
    """logits = W q̃ + b, (..., D) -> (..., C+1); softmax gives p(c | q̃), index C = no object.

    Prompts for CPM (``prompts``, built only when MODEL.CPM.ENABLED; MODEL.CPM.LINEAR_HEAD_PROMPTS):
    * ``"embedding"``: the paper's "Point Rep." (Table 5): a learnable (C+1) x D embedding, one
      vector per label; ``sample(labels)`` returns its rows, with gradient, so the prompting losses
      train it;
    * ``"fixed_random"``: one N(0, 1) vector per label drawn at construction and never trained (a
      buffer): Point Rep.'s codes at their initial values, to separate "a fixed code per class"
      from "a code the prompting losses learn";
    * ``"gmm"``: samples of per-class Gaussian mixtures fitted by EM to the matched embeddings
      (CCDM's generative model, :class:`~.mixture.ClassMixtures` with ``MODEL.MASK_FORMER.GMM.*``),
      used for the prompts only: the classes are still predicted by the softmax. Separates
      "prompts from a distribution" from "a generative classifier".
    """

    @configurable
    def __init__(self, *, num_classes: int, embed_dim: int, prompts: str = "none", prompt_gmm: nn.Module = None):
        super().__init__()
        if prompts not in ("none", "embedding", "fixed_random", "gmm"):
            raise ValueError("prompts (MODEL.CPM.LINEAR_HEAD_PROMPTS) must be none | embedding | fixed_random | gmm, "
                             f"got {prompts!r}")
        if (prompts == "gmm") != (prompt_gmm is not None):
            raise ValueError("prompts 'gmm' needs a prompt_gmm (and only it)")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.linear = nn.Linear(embed_dim, num_classes + 1)
        self.prompt_source = prompts
        self.can_sample = prompts != "none"
        if prompts == "embedding":
            self.prompts = nn.Embedding(num_classes + 1, embed_dim)
        elif prompts == "fixed_random":
            self.register_buffer("fixed_prompts", torch.randn(num_classes + 1, embed_dim))
        self.prompt_gmm = prompt_gmm

    @classmethod
    def from_config(cls, cfg, num_classes, embed_dim):
        prompts = cfg.MODEL.CPM.LINEAR_HEAD_PROMPTS if cfg.MODEL.CPM.ENABLED else "none"
        prompt_gmm = None
        if prompts == "gmm":
            from .gmm import mixture_options_from_config
            from .mixture import ClassMixtures

            # only observed and sampled from; "no object" (index C) is never banked nor prompted
            prompt_gmm = ClassMixtures(num_mixtures=num_classes + 1, embed_dim=embed_dim,
                                       **mixture_options_from_config(cfg))
        return {"num_classes": num_classes, "embed_dim": embed_dim, "prompts": prompts, "prompt_gmm": prompt_gmm}

    @record_function("cpm.class_head")
    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear(embeddings)

    def observe(self, embeddings: torch.Tensor, labels: torch.Tensor, iteration: int = 0, sources=None,
                predictions=None) -> None:
        if self.prompt_gmm is not None:
            keep = labels < self.num_classes
            self.prompt_gmm.observe(embeddings[keep], labels[keep], iteration, None if sources is None else sources[keep])

    def step(self, iteration: int) -> None:
        if self.prompt_gmm is not None:
            self.prompt_gmm.step(iteration)

    def bank_age(self, iteration: int):
        """The prompt mixtures' bank ages (C+1,) (``"gmm"`` prompts), else None."""
        return None if self.prompt_gmm is None else self.prompt_gmm.bank_age(iteration)

    @property
    def mixtures(self):
        """The prompt mixtures (``"gmm"`` prompts), else None."""
        return self.prompt_gmm

    def can_prompt(self, labels: torch.Tensor) -> torch.Tensor:
        """(N,) bool: with ``"gmm"`` prompts, the labels whose mixture has been fitted; else all."""
        if self.prompt_gmm is None:
            return super().can_prompt(labels)
        return self.prompt_gmm.fitted[labels.to(self.prompt_gmm.fitted.device).long()]

    def sample(self, labels: torch.Tensor, generator=None) -> torch.Tensor:
        """labels (K,) -> prompts (K, D): learnable rows ("embedding"), fixed rows ("fixed_random") or
        mixture samples ("gmm")."""
        if not self.can_sample:
            return super().sample(labels)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(f"sample labels must lie in [0, {self.num_classes}]")
        if self.prompt_gmm is not None:
            return self.prompt_gmm.sample(labels, generator)
        if self.prompt_source == "fixed_random":
            return self.fixed_prompts[labels.to(self.fixed_prompts.device).long()]
        return self.prompts(labels.to(self.prompts.weight.device).long())
