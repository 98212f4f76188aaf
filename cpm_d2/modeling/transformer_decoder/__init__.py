from .registry import TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder
from .position_encoding import PositionEmbeddingSine
from .query_groups import QueryGroup
from .audio_visual_decoder import AudioVisualTransformerDecoder

__all__ = ["TRANSFORMER_DECODER_REGISTRY", "build_transformer_decoder", "PositionEmbeddingSine", "QueryGroup",
           "AudioVisualTransformerDecoder"]
