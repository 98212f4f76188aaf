from .base import CLASS_PREDICTOR_REGISTRY, ClassPredictor, build_class_predictor
from . import gmm  # noqa: F401  (registers GMMClassPredictor)

__all__ = ["CLASS_PREDICTOR_REGISTRY", "ClassPredictor", "build_class_predictor"]
