"""The audio pixel decoder: an FPN over the audio backbone's stages.

AudioPixelDecoder: FPN top-down over res2..res5 ->
    feature_map u_a  (B, D_a, T/4, F/4)  the fused stride-4 map (the audio feature space of PCL),
    dense ũ_a        (B, D_a, T/4, F/4)  a 1x1 projection of u_a; audio masks are <embedding, ũ_a>,
    tokens           (B, L, D_q)         res5 projected to the decoder width, L = T/32 * F/32,
    tokens_pos       (B, L, D_q)         2-D sine positional encoding of the tokens (keys only).
"""
from typing import Dict

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec

from ..transformer_decoder.position_encoding import PositionEmbeddingSine
from .fpn import fpn_lateral_and_output, fpn_top_down

__all__ = ["AudioPixelDecoder"]


class AudioPixelDecoder(nn.Module):
    """FPN over the audio stages -> dict(tokens, tokens_pos, dense, feature_map) (see module doc)."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, conv_dim: int, token_dim: int, norm: str = "GN"):
        super().__init__()
        items = sorted(input_shape.items(), key=lambda kv: -kv[1].stride)  # coarse -> fine
        self.in_features = [k for k, _ in items]
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for _, spec in items:
            lat, out = fpn_lateral_and_output(spec.channels, conv_dim, norm)
            self.lateral_convs.append(lat)
            self.output_convs.append(out)
        self.dense_proj = Conv2d(conv_dim, conv_dim, 1)
        weight_init.c2_xavier_fill(self.dense_proj)
        self.token_proj = nn.Linear(items[0][1].channels, token_dim)
        self.token_norm = nn.LayerNorm(token_dim)
        self.pe_layer = PositionEmbeddingSine(token_dim // 2, normalize=True)

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {
            "input_shape": input_shape,
            "conv_dim": cfg.MODEL.AUDIO.PIXEL_DECODER_DIM,
            "token_dim": cfg.MODEL.MASK_FORMER.HIDDEN_DIM,
            "norm": cfg.MODEL.SEM_SEG_HEAD.NORM,
        }

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        y = fpn_top_down([features[k] for k in self.in_features], self.lateral_convs, self.output_convs)[-1]
        coarse = features[self.in_features[0]]
        tokens = self.token_norm(self.token_proj(coarse.flatten(2).transpose(1, 2)))
        tokens_pos = self.pe_layer(coarse).flatten(2).transpose(1, 2)
        return {"tokens": tokens, "tokens_pos": tokens_pos, "dense": self.dense_proj(y), "feature_map": y}
