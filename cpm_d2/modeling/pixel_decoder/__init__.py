from .registry import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .fpn import FPNPixelDecoder
from .msdeform_attn import MSDeformAttn, MSDeformAttnPixelDecoder, ms_deform_attn_core

__all__ = [
    "PIXEL_DECODER_REGISTRY", "build_pixel_decoder", "FPNPixelDecoder", "MSDeformAttnPixelDecoder",
    "MSDeformAttn", "ms_deform_attn_core",
]
