"""Registry of pixel decoders (our own; detectron2's SEM_SEG_HEADS_REGISTRY is not used)."""
from detectron2.utils.registry import Registry

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Pixel decoders turn the visual backbone's feature dict into
``(mask_features (B, MASK_DIM, H/4, W/4), [3 multi-scale maps (B, CONVS_DIM, h_l, w_l), coarsest first])``.
Called as ``PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)``; input_shape is the backbone's
``output_shape()`` dict of ShapeSpec.
"""


def decoder_input_shape(cfg, input_shape):
    """The backbone features a pixel decoder reads: SEM_SEG_HEAD.IN_FEATURES with a stride of at
    least SEM_SEG_HEAD.COMMON_STRIDE (the stride of the mask features, as in Mask2Former)."""
    head = cfg.MODEL.SEM_SEG_HEAD
    return {k: v for k, v in input_shape.items() if k in head.IN_FEATURES and v.stride >= head.COMMON_STRIDE}


def build_pixel_decoder(cfg, input_shape):
    """Build ``cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME`` for the backbone ``input_shape``."""
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    missing = [f for f in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES if f not in input_shape]
    if missing:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.IN_FEATURES {missing} are not produced by "
            f"the backbone (it gives {sorted(input_shape)}); check MODEL.RESNETS.OUT_FEATURES"
        )
    return PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)
