"""The head registry for query classification and the interface every class predictor follows."""
import torch
from torch import nn
from detectron2.utils.registry import Registry

CLASS_PREDICTOR_REGISTRY = Registry("CLASS_PREDICTOR")
CLASS_PREDICTOR_REGISTRY.__doc__ = """
Class predictors map mask embeddings q~ (..., D) to class logits (..., C+1) whose softmax is
p(c | q~); index C is "no object". Built by name from cfg.MODEL.MASK_FORMER.CLASS_PREDICTOR.
"""


class ClassPredictor(nn.Module):
    """Interface of a class predictor (the head registry).

    forward(embeddings (..., D), prediction=None) -> logits (..., C+1); softmax(logits) = p(c | q~).
        ``prediction``: which of the decoder's predictions the embeddings come from (0 = the first,
        ``num_predictions - 1`` or None = the final one); only predictors with ``num_predictions``
        > 1 read it, the decoder then calls them once per prediction.
    observe(embeddings (K, D), labels (K,) in [0, C], iteration, sources=None, predictions=None):
        training-only; called after Hungarian matching with the (detached) embeddings, their
        assigned labels (C = no object) and, optionally, each row's prediction index.
    step(iteration): training-only; called once per iteration after ``observe`` (periodic work
        such as EM).
    sample(labels (K,)) -> (K, D): class-conditional prompts z^k, one per requested label; only
        predictors with ``can_sample = True`` implement it (CPM's prompting needs one).
    can_prompt(labels (K,)) -> (K,) bool: which labels can be prompted now (a mixture not yet
        fitted cannot); prompts of the others are left out.
    mixtures: the per-class Gaussian mixtures (``ClassMixtures``), on predictors that have them
        (read it with ``getattr(predictor, "mixtures", None)``).
    """

    num_classes: int  # C, background included; logits have C + 1 entries
    can_sample: bool = False  # True if sample() draws class-conditional prompts
    num_predictions: int = 1  # > 1: the head keeps a state per decoder prediction (see forward)

    def observe(self, embeddings: torch.Tensor, labels: torch.Tensor, iteration: int = 0, sources=None,
                predictions=None) -> None:
        pass

    def step(self, iteration: int) -> None:
        pass

    def can_prompt(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.ones(labels.shape, dtype=torch.bool, device=labels.device)

    def sample(self, labels: torch.Tensor, generator=None) -> torch.Tensor:
        raise RuntimeError(
            f"{type(self).__name__} has no class-conditional prompts to sample (can_sample is False); "
            "MODEL.CPM.ENABLED needs GMMClassPredictor or LinearClassPredictor"
        )


def build_class_predictor(cfg, num_classes: int, embed_dim: int) -> ClassPredictor:
    """Build ``cfg.MODEL.MASK_FORMER.CLASS_PREDICTOR`` for ``num_classes`` (C) and D = ``embed_dim``."""
    name = cfg.MODEL.MASK_FORMER.CLASS_PREDICTOR
    return CLASS_PREDICTOR_REGISTRY.get(name)(cfg, num_classes=num_classes, embed_dim=embed_dim)
