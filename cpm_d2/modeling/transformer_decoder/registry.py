"""Registry of query decoders."""
from detectron2.utils.registry import Registry

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Query decoders turn (multi-scale visual features, mask features, audio tokens) into per-query
class logits and mask logits at every layer. Called as
``TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels)``.
"""


def build_transformer_decoder(cfg, in_channels: int):
    """Build cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME over features of ``in_channels``."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels)
