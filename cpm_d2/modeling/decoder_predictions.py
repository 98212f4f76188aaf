"""How many predictions (class logits + masks) one pass of the audio-visual decoder makes.

One per audio decoder layer (one of the raw queries when there are none) plus one per
masked-attention layer of the visual decoder (Mask2Former counts ``MASK_FORMER.DEC_LAYERS - 1`` of
them: its DEC_LAYERS includes the prediction made before the first layer). The last is the final
prediction; the others are the auxiliary ones of deep supervision. The decoder, the criterion's loss
weights and the class predictor's per-prediction state all use this one rule.
"""

__all__ = ["count_predictions", "decoder_predictions"]


def count_predictions(masked_attention_layers: int, audio_layers: int) -> int:
    """Predictions of a decoder with these layer counts (the decoder constructor's integers)."""
    return max(audio_layers, 1) + masked_attention_layers


def decoder_predictions(cfg) -> int:
    """Predictions of the decoder ``cfg.MODEL.MASK_FORMER`` describes."""
    mf = cfg.MODEL.MASK_FORMER
    return count_predictions(mf.DEC_LAYERS - 1, mf.AUDIO_DEC_LAYERS)
