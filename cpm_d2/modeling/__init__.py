"""Modeling: importing this package registers every model piece with its registry."""
from . import class_predictor  # noqa: F401  (registry + interface)
from .class_predictor import linear  # noqa: F401  (registers LinearClassPredictor)
from .backbone import AUDIO_BACKBONE_REGISTRY, build_audio_backbone
from .pixel_decoder import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .transformer_decoder import TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder
from .matcher import HungarianMatcher
from .criterion import SetCriterion
from .meta_arch import CPM

__all__ = [
    "AUDIO_BACKBONE_REGISTRY", "build_audio_backbone", "PIXEL_DECODER_REGISTRY", "build_pixel_decoder",
    "TRANSFORMER_DECODER_REGISTRY", "build_transformer_decoder", "HungarianMatcher", "SetCriterion", "CPM",
]
