from .registry import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .audio_pixel_decoder import AudioPixelDecoder
from .fpn import FPNPixelDecoder
from .msdeform_attn import MSDeformAttn, MSDeformAttnPixelDecoder, ms_deform_attn_core

__all__ = [
    "PIXEL_DECODER_REGISTRY", "build_pixel_decoder", "AudioPixelDecoder", "FPNPixelDecoder", "MSDeformAttnPixelDecoder",
    "MSDeformAttn", "ms_deform_attn_core",
]
