"""Fixed 2-D sine/cosine positional encoding (the DETR / Mask2Former convention)."""
import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Sine positional encoding of a 2-D grid.

    forward(x (B, *, H, W)) -> pos (B, 2 * num_pos_feats, H, W). The first ``num_pos_feats``
    channels encode the row (y), the rest the column (x); each half interleaves sin and cos at
    geometrically spaced frequencies ``temperature ** (2i / num_pos_feats)``. With ``normalize``
    the coordinates are scaled to [0, scale] over the grid, so the code depends on the relative
    position only (used for feature maps whose size changes with the input).
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi):
        super().__init__()
        if num_pos_feats % 2 != 0:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats} (the encoded width 2 x num_pos_feats, e.g. "
                             "MODEL.MASK_FORMER.HIDDEN_DIM or MODEL.SEM_SEG_HEAD.CONVS_DIM, must be a multiple of 4)")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        dtype = torch.float32
        # Coordinates of the cell centres' indices, 1-based like a cumulative sum over a mask.
        y = torch.arange(1, h + 1, device=x.device, dtype=dtype)[:, None].expand(h, w)
        xs = torch.arange(1, w + 1, device=x.device, dtype=dtype)[None, :].expand(h, w)
        if self.normalize:
            eps = 1e-6
            y = y / (h + eps) * self.scale
            xs = xs / (w + eps) * self.scale
        i = torch.arange(self.num_pos_feats, device=x.device, dtype=dtype)
        freq = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_y = y[..., None] / freq  # H, W, F
        pos_x = xs[..., None] / freq
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=-1).flatten(-2)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(-2)
        pos = torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1)  # 2F, H, W
        return pos.unsqueeze(0).expand(b, -1, -1, -1).to(x.dtype)
