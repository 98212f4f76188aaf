"""A light FPN pixel decoder (Mask2Former's "BasePixelDecoder" idea): fast, used in tests."""
from typing import Dict, List, Tuple

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm

from .registry import PIXEL_DECODER_REGISTRY, decoder_input_shape


def fpn_lateral_and_output(in_channels: int, conv_dim: int, norm: str) -> Tuple[nn.Module, nn.Module]:
    """The FPN pair of one level: 1x1 lateral (in_channels -> conv_dim), 3x3 output + ReLU."""
    lateral = Conv2d(in_channels, conv_dim, 1, bias=not norm, norm=get_norm(norm, conv_dim))
    output = Conv2d(conv_dim, conv_dim, 3, padding=1, bias=not norm, norm=get_norm(norm, conv_dim),
                    activation=F.relu)
    weight_init.c2_xavier_fill(lateral)
    weight_init.c2_xavier_fill(output)
    return lateral, output

def fpn_top_down(features, lateral_convs, output_convs, top=None, mode="bilinear") -> List[torch.Tensor]:
    """The FPN top-down pass shared by every pixel decoder (visual and audio).

    For each level from coarse to fine: ``y = output(lateral(x) + upsample(y))``, where the first
    level has no ``y`` unless ``top`` (a coarser map, e.g. a transformer encoder's output) is given.
    ``mode``: the upsampling ("bilinear" with align_corners=False, or "nearest"). Returns every
    level's ``y``, coarsest first.
    """
    outs, y = [], top
    for x, lateral, output in zip(features, lateral_convs, output_convs):
        z = lateral(x)
        if y is not None:
            extra = {} if mode == "nearest" else {"align_corners": False}
            z = z + F.interpolate(y, size=z.shape[-2:], mode=mode, **extra)
        y = output(z)
        outs.append(y)
    return outs


__all__ = ["FPNPixelDecoder", "fpn_top_down", "fpn_lateral_and_output"]


@PIXEL_DECODER_REGISTRY.register()
class FPNPixelDecoder(nn.Module):
    """Top-down FPN over ``in_features``.

    forward(features: dict name -> (B, C_l, H/s_l, W/s_l)) ->
        mask_features (B, mask_dim, H/s_min, W/s_min) from the finest level (3x3 conv),
        multi_scale_features: the FPN outputs of the 3 coarsest levels (B, conv_dim, ...),
        coarsest first (Mask2Former's order for the round-robin masked attention).
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, conv_dim: int, mask_dim: int, norm: str = "GN"):
        super().__init__()
        if len(input_shape) < 3:
            raise ValueError(f"FPNPixelDecoder needs >= 3 input features (MODEL.SEM_SEG_HEAD.IN_FEATURES), "
                             f"got {list(input_shape)}")
        # coarse -> fine
        items = sorted(input_shape.items(), key=lambda kv: -kv[1].stride)
        self.in_features = [k for k, _ in items]
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for idx, (_, spec) in enumerate(items):
            if idx == 0:
                lateral = None
                output = Conv2d(spec.channels, conv_dim, 3, padding=1, bias=not norm,
                                norm=get_norm(norm, conv_dim), activation=F.relu)
                weight_init.c2_xavier_fill(output)
            else:
                lateral, output = fpn_lateral_and_output(spec.channels, conv_dim, norm)
            self.lateral_convs.append(lateral if lateral is not None else nn.Identity())
            self.output_convs.append(output)
        self.mask_features = Conv2d(conv_dim, mask_dim, 3, padding=1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.num_feature_levels = 3

    @classmethod
    def from_config(cls, cfg, input_shape):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": decoder_input_shape(cfg, input_shape),
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
        }

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        outs = fpn_top_down([features[k] for k in self.in_features], self.lateral_convs, self.output_convs,
                            mode="nearest")
        return self.mask_features(outs[-1]), outs[: self.num_feature_levels]
