"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch, and the Mask2Former-style
pixel decoder built on it.

No compiled op: sampling is ``F.grid_sample`` per feature level (bilinear, zero padding,
``align_corners=False``, so a location (x, y) in [0, 1]^2 addresses the continuous image plane and
the centre of cell (i, j) of an h x w map is ((j + 0.5) / w, (i + 0.5) / h)).
"""
import math
from typing import Dict, List, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec

from ..transformer_decoder.position_encoding import PositionEmbeddingSine
from .fpn import fpn_lateral_and_output, fpn_top_down
from .registry import PIXEL_DECODER_REGISTRY, decoder_input_shape

__all__ = ["ms_deform_attn_core", "MSDeformAttn", "MSDeformAttnEncoder", "MSDeformAttnPixelDecoder"]


def ms_deform_attn_core(
    value: torch.Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinearly sampled values.

    Args:
        value: (B, S, nH, Dh), the flattened levels concatenated (S = sum h_l * w_l).
        spatial_shapes: [(h_l, w_l)] per level, in the order of ``value``.
        sampling_locations: (B, Lq, nH, L, P, 2) as (x, y) in [0, 1].
        attention_weights: (B, Lq, nH, L, P), normalised over (L, P).
    Returns:
        (B, Lq, nH * Dh)
    """
    b, _, n_heads, head_dim = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2.0 * sampling_locations - 1.0
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = values[lvl].permute(0, 2, 3, 1).reshape(b * n_heads, head_dim, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * n_heads, lq, n_points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(sampled, dim=-2).flatten(-2)  # (B*nH, Dh, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(b * n_heads, 1, lq, n_levels * n_points)
    out = (sampled * weights).sum(-1)  # (B*nH, Dh, Lq)
    return out.view(b, n_heads * head_dim, lq).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    forward(query (B, Lq, d), reference_points (B, Lq, L, 2) in [0, 1], value_in (B, S, d),
            spatial_shapes [(h_l, w_l)]) -> (B, Lq, d).
    Each head looks at ``n_points`` learned offsets around the reference point on every level;
    offsets are in units of that level's cells.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model {d_model} (MODEL.SEM_SEG_HEAD.CONVS_DIM) is not divisible by n_heads {n_heads} "
                             "(MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS)")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        # Deformable DETR init: zero offset weights, biases spread the points of each head along a
        # direction (head h looks towards angle 2*pi*h/nH), point p at distance p+1 cells.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query, reference_points, value_in, spatial_shapes):
        b, lq, _ = query.shape
        s = value_in.shape[1]
        if s != sum(h * w for h, w in spatial_shapes):
            raise ValueError(f"value has {s} positions, spatial_shapes {list(spatial_shapes)} "
                             "describe a different number")
        value = self.value_proj(value_in).view(b, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(b, lq, self.n_heads, self.n_levels, self.n_points, 2)
        attn = self.attention_weights(query).view(b, lq, self.n_heads, self.n_levels * self.n_points)
        attn = attn.softmax(-1).view(b, lq, self.n_heads, self.n_levels, self.n_points)
        # offsets are in cells of each level: divide by (w_l, h_l) to get [0, 1] units
        wh = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        loc = reference_points[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
        out = ms_deform_attn_core(value, spatial_shapes, loc, attn)
        return self.output_proj(out)


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention + FFN. (B, S, d) -> (B, S, d)."""

    def __init__(self, d_model, dim_feedforward, dropout, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes):
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference_points, src, spatial_shapes)))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnEncoder(nn.Module):
    """Stack of deformable encoder layers over L flattened levels (no padding mask: the padded image
    border is treated as image content, as Mask2Former does)."""

    def __init__(self, d_model=256, n_heads=8, num_layers=6, dim_feedforward=1024, dropout=0.0,
                 n_levels=3, n_points=4):
        super().__init__()
        self.layers = nn.ModuleList(
            [MSDeformAttnEncoderLayer(d_model, dim_feedforward, dropout, n_levels, n_heads, n_points)
             for _ in range(num_layers)]
        )

    @staticmethod
    def reference_points(spatial_shapes, batch_size, device, dtype):
        """Cell centres of every level in [0, 1], repeated for each level: (B, S, L, 2)."""
        refs = []
        for h, w in spatial_shapes:
            ys, xs = torch.meshgrid(
                (torch.arange(h, device=device, dtype=dtype) + 0.5) / h,
                (torch.arange(w, device=device, dtype=dtype) + 0.5) / w,
                indexing="ij",
            )
            refs.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
        ref = torch.cat(refs, 0)  # (S, 2)
        return ref[None, :, None, :].expand(batch_size, -1, len(spatial_shapes), -1)

    def forward(self, src, pos, spatial_shapes):
        ref = self.reference_points(spatial_shapes, src.shape[0], src.device, src.dtype)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes)
        return src


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder: deformable-attention encoder over the coarse levels
    (``transformer_in_features``, e.g. res3-res5), then an FPN step to the finer levels (res2).

    forward(features: dict) -> (mask_features (B, mask_dim, H/4, W/4),
                                multi_scale_features: 3 x (B, conv_dim, h_l, w_l), coarsest first).
    Decisions: the encoder uses SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS / _N_POINTS,
    MASK_FORMER.DROPOUT and an FFN of 4 * conv_dim (1024 for conv_dim 256, Mask2Former's value);
    mask_features is a 1x1 conv.
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, transformer_in_features: List[str],
                 conv_dim: int, mask_dim: int, norm: str, num_layers: int, n_heads: int, n_points: int,
                 dropout: float, dim_feedforward: int):
        super().__init__()
        for f in transformer_in_features:
            if f not in input_shape:
                raise ValueError(
                    f"MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES has {f!r}, which is not in "
                    f"MODEL.SEM_SEG_HEAD.IN_FEATURES / the backbone outputs {sorted(input_shape)}"
                )
        items = sorted(input_shape.items(), key=lambda kv: -kv[1].stride)  # coarse -> fine
        self.transformer_in_features = [k for k, _ in items if k in transformer_in_features]
        self.fpn_in_features = [k for k, _ in items if k not in transformer_in_features]
        if self.fpn_in_features and min(input_shape[k].stride for k in self.fpn_in_features) > min(
                input_shape[k].stride for k in self.transformer_in_features):
            raise ValueError(f"MODEL.SEM_SEG_HEAD.IN_FEATURES outside DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES "
                             f"({self.fpn_in_features}) must be finer (smaller stride) than those inside "
                             f"({self.transformer_in_features})")
        n_levels = len(self.transformer_in_features)
        self.input_proj = nn.ModuleList()
        for k in self.transformer_in_features:
            proj = nn.Sequential(nn.Conv2d(input_shape[k].channels, conv_dim, 1), nn.GroupNorm(32, conv_dim))
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        self.encoder = MSDeformAttnEncoder(conv_dim, n_heads, num_layers, dim_feedforward, dropout, n_levels, n_points)
        self.level_embed = nn.Parameter(torch.empty(n_levels, conv_dim).normal_())
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for k in self.fpn_in_features:
            lat, out = fpn_lateral_and_output(input_shape[k].channels, conv_dim, norm)
            self.lateral_convs.append(lat)
            self.output_convs.append(out)
        self.mask_features = Conv2d(conv_dim, mask_dim, 1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.num_feature_levels = 3
        if n_levels < self.num_feature_levels:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES must name >= 3 features, "
                             f"got {self.transformer_in_features}")

    @classmethod
    def from_config(cls, cfg, input_shape):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": decoder_input_shape(cfg, input_shape),
            "transformer_in_features": list(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "num_layers": head.TRANSFORMER_ENC_LAYERS,
            "n_heads": head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS,
            "n_points": head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            "dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "dim_feedforward": 4 * head.CONVS_DIM,
        }

    def forward(self, features: Dict[str, torch.Tensor]):
        srcs, pos, shapes = [], [], []
        for lvl, k in enumerate(self.transformer_in_features):
            x = self.input_proj[lvl](features[k])
            shapes.append((x.shape[-2], x.shape[-1]))
            pos.append((self.pe_layer(x) + self.level_embed[lvl].view(1, -1, 1, 1)).flatten(2).transpose(1, 2))
            srcs.append(x.flatten(2).transpose(1, 2))
        memory = self.encoder(torch.cat(srcs, 1), torch.cat(pos, 1), shapes)
        outs = []
        for (h, w), m in zip(shapes, memory.split([h * w for h, w in shapes], dim=1)):
            outs.append(m.transpose(1, 2).reshape(m.shape[0], -1, h, w))
        outs += fpn_top_down([features[k] for k in self.fpn_in_features], self.lateral_convs, self.output_convs,
                             top=outs[-1])
        return self.mask_features(outs[-1]), outs[: self.num_feature_levels]
