"""Stereo source position for the audio-visual decoder (``MODEL.AUDIO.STEREO_POSITION``).

Why. In the paper (§4.4, "Limitations") stereo audio enters only through the audio backbone's
2-channel first convolution, so *where* a sound comes from and *what* it is are encoded jointly,
and no AVS transformer has a positional encoding made for stereo; its weakest result is VPO-MSMI
(two or more visible instances of one class, only one of which sounds: +0.19 mIoU over CAVP,
against +4.78 on SS). Nothing in the decoder can tell two identical instances apart: visual
positions enter only the *keys* of the masked cross-attention (2-D sine encoding), never the
values nor the per-pixel mask embeddings ũ_v, so a query's mask ``<mask_embed(q̃), ũ_v>`` is the
same on both instances whatever it heard. This module gives each query an explicit estimate of
where its sound is, from the level difference between the channels, and turns it into a prior
over image columns on that query's mask.

Design (B images, Q queries, D query width, D_a audio width; all shapes batch-first):

1. Spatial cue, parameter-free (:func:`stereo_cues`), from the *linear* magnitudes the mapper
   ships, before the log:
       a (B, 2, T, F)          L = a[:, 0], R = a[:, 1] (stereo only: mono is an error)
       e (B, T, F) = L² + R²   (independent of the pan under constant-power panning)
       x (B, T, F) = (2/π) · atan2(R, L) ∈ [0, 1], 0 = left edge, 1 = right edge of the frame.
   The generator pans with L = cos(θ) s, R = sin(θ) s, θ = (π/2) · x_src/W, so for one source per
   time-frequency bin the estimate is the source centre x_src / W exactly (a mel filterbank keeps
   it: every band's R/L ratio is still tan θ). The front end keeps magnitudes only, so there is no inter-channel phase or
   time difference here; for panned sources the level difference alone determines x, and it is
   all VPO's synthesised stereo carries. Pooled to the grid (T', F') of the dense audio map ũ_a
   by energy-weighted adaptive average pooling over each cell:
       E (B, T', F') = pool(e),  X (B, T', F') = pool(e · x) / pool(e)   (X = 0.5 where E = 0)
   Swapping the channels maps X to 1 − X exactly and leaves E unchanged.

2. Per query (:class:`StereoPositionPrior`, with the decoder's prediction heads after every
   audio-decoder layer; after the raw queries when there is none): the query picks its own
   sound's bins with its audio mask, the same head (``audio_mask_embed``) CPM's ACP trains to
   separate a class's bins from the rest:
       m^a (B, Q, T'F') = <audio_mask_embed(q̃), ũ_a>
       w   (B, Q, T'F') = softmax over cells of (m^a + log(E + ε))   (energy prior, query choice)
       x̂   (B, Q)       = Σ w · X ∈ [0, 1]                          (frame coordinates)
       g   (B, Q)       = softplus(<w_g, q̃> + b_g) ≥ 0              (per-query gain, learned: a
                          query for which stereo says nothing, e.g. background, can switch it off)

3. Image side: "stereo_frame" (B, 2) = (o, s), the frame's left edge and its width as fractions
   of the padded canvas the mask features cover (from the mapper's ``audio_frame_span``, which
   follows crops and flips, and the model's padding), so a frame coordinate x lands at o + s·x.
   Over the W_m columns of the mask-feature grid, centres u_j = (j + 0.5) / W_m:
       bias (B, Q, 1, W_m) = −g · ((u_j − (o + s·x̂)) / (s · σ))²      σ = STEREO_POSITION.WIDTH
       pred_masks          = <mask_embed(q̃), ũ_v> + bias
   The visual decoder does not hear the audio again, so the last audio prediction's bias is
   added as it is to the mask logits of every visual-decoder prediction. Mask2Former's masked
   attention builds each layer's attention mask from the previous prediction's mask, so the
   same prior also decides which columns a query reads visual features from: it is the
   attention bias over image columns, applied once where both the mask and the attention read it.

Why this path and not a positional term on the audio tokens: a term in the audio tokens' keys
only changes *which* audio tokens a query reads; in their values it makes the query carry x, but
the network would still have to learn to align a learned projection of it with the visual sine
code through several layers, and the final mask (a dot product with position-free ũ_v) would
still be the same on both instances. A per-query x̂ acts where the decision is made, is exact
under the flip (the mapper swaps the channels when it mirrors the image: X ↦ 1 − X while the
columns mirror), and costs O(Q · T'F' · D_a + Q · W_m) per audio-decoder layer and one addition
per visual-decoder layer (tools/benchmark.py --stereo-position measures it).

Separate encoding (``STEREO_POSITION.BACKBONE_INPUT``, default "mid"): the audio backbone sees the
channel mean in both of its input channels, so the semantic features cannot see position and
the cue above is the only way position enters: the separation the paper's "Limitations" asks
for. "stereo" keeps the paper's 2-channel stem as well (position also enters jointly);
docs/stereo.md compares the two.

Flip / swap symmetry: X is exactly mirrored by a channel swap; x̂ is too when the query's audio
mask m^a does not change under the swap, which holds exactly with "mid" and approximately with
"stereo" (trained with flips that swap the channels).
"""
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["stereo_cues", "frame_on_canvas", "StereoPositionPrior", "check_stereo_config", "STEREO_KEYS",
           "BACKBONE_INPUTS"]

# Keys the error messages name, so a user knows what to change.
STEREO_KEYS = "MODEL.AUDIO.STEREO_POSITION.ENABLED (needs INPUT.AUDIO.CHANNELS 2 and MODEL.AUDIO.IN_CHANNELS 2)"
BACKBONE_INPUTS = ("stereo", "mid")


def check_stereo_config(cfg) -> bool:
    """True when the switch is on; raises a ValueError naming the keys when it is on with mono audio
    or an unknown setting."""
    sp = cfg.MODEL.AUDIO.STEREO_POSITION
    if not sp.ENABLED:
        return False
    ca, cm = int(cfg.INPUT.AUDIO.CHANNELS), int(cfg.MODEL.AUDIO.IN_CHANNELS)
    if ca != 2 or cm != 2:
        raise ValueError(
            f"MODEL.AUDIO.STEREO_POSITION.ENABLED is True but the audio is not stereo (INPUT.AUDIO.CHANNELS = {ca}, "
            f"MODEL.AUDIO.IN_CHANNELS = {cm}): the stereo position needs 2 channels; set both to 2, or set "
            "MODEL.AUDIO.STEREO_POSITION.ENABLED False"
        )
    if sp.BACKBONE_INPUT not in BACKBONE_INPUTS:
        raise ValueError(f"MODEL.AUDIO.STEREO_POSITION.BACKBONE_INPUT must be one of {BACKBONE_INPUTS}, "
                         f"got {sp.BACKBONE_INPUT!r}")
    if not sp.WIDTH > 0:
        raise ValueError(f"MODEL.AUDIO.STEREO_POSITION.WIDTH must be > 0 (a fraction of the frame width), got {sp.WIDTH}")
    if not sp.INIT_GAIN > 0:
        raise ValueError(f"MODEL.AUDIO.STEREO_POSITION.INIT_GAIN must be > 0, got {sp.INIT_GAIN}")
    return True


@torch.no_grad()
def stereo_cues(magnitude: torch.Tensor, grid: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Inter-channel level difference -> source x per cell (module docstring, step 1).

    Args:
        magnitude: (B, 2, T, F) linear magnitudes, channel 0 = left, 1 = right.
        grid: (T', F') of the cells (the dense audio map's grid).
    Returns: {"stereo_x": X (B, T', F') in [0, 1], "stereo_log_energy": log(E + eps) (B, T', F')};
    float32, no gradient (a fixed function of the input).
    """
    if magnitude.dim() != 4 or magnitude.shape[1] != 2:
        raise ValueError(f"{STEREO_KEYS}: expected stereo magnitudes (B, 2, T, F), got "
                         f"{tuple(magnitude.shape)}")
    mag = magnitude.float().clamp_min(0)
    left, right = mag[:, 0], mag[:, 1]
    energy = left * left + right * right  # (B, T, F)
    x = torch.atan2(right, left) * (2.0 / math.pi)  # atan2(0, 0) = 0: weight 0 below anyway
    grid = (int(grid[0]), int(grid[1]))
    pooled_e = F.adaptive_avg_pool2d(energy[:, None], grid)[:, 0]
    pooled_ex = F.adaptive_avg_pool2d((energy * x)[:, None], grid)[:, 0]
    tiny = torch.finfo(torch.float32).tiny
    cell_x = torch.where(pooled_e > tiny, pooled_ex / pooled_e.clamp_min(tiny), torch.full_like(pooled_e, 0.5))
    # eps: relative to each clip's loudest cell, so silence (all zero) gives a flat prior (x = 0.5)
    eps = 1e-8 * pooled_e.flatten(1).amax(1).clamp_min(1e-20)[:, None, None]
    return {"stereo_x": cell_x.clamp(0.0, 1.0), "stereo_log_energy": torch.log(pooled_e + eps)}


def frame_on_canvas(spans: torch.Tensor, image_sizes: Sequence[Tuple[int, int]], padded_width: int) -> torch.Tensor:
    """(B, 2) "stereo_frame" = (o, s): where the audio frame lies on the padded canvas.

    Args:
        spans: (B, 2) the output image's x fractions of the audio frame's left and right edges
            (the mapper's ``audio_frame_span``; (0, 1) when the image is the whole frame).
        image_sizes: (h, w) of each image before the model's padding.
        padded_width: width of the padded batch tensor.
    """
    widths = torch.tensor([float(w) for _, w in image_sizes], dtype=torch.float32, device=spans.device)
    scale = widths / float(padded_width)
    left, right = spans[:, 0].float() * scale, spans[:, 1].float() * scale
    return torch.stack([left, right - left], dim=1)


class StereoPositionPrior(nn.Module):
    """Per-query x estimate and its column prior on the mask logits (module docstring, steps 2-3).

    Parameters (created without drawing random numbers, so turning the switch on leaves the
    initialisation of every other weight of a seeded model unchanged): the gain head ``gain_weight``
    (D,) = 0 and ``gain_bias`` () = softplus⁻¹(INIT_GAIN).
    """

    def __init__(self, hidden_dim: int, width: float = 0.1, init_gain: float = 0.5):
        super().__init__()
        self.width = float(width)
        self.gain_weight = nn.Parameter(torch.zeros(hidden_dim))
        self.gain_bias = nn.Parameter(torch.tensor(math.log(math.expm1(float(init_gain)))))

    def prepare(self, audio: Dict[str, torch.Tensor], mask_width: int) -> Dict[str, torch.Tensor]:
        """What every prediction of one forward shares (computed once): the cues flattened and the
        column centres in units of sigma frame widths, relative to the frame's left edge."""
        cell_x, log_e = audio["stereo_x"], audio["stereo_log_energy"]
        b = cell_x.shape[0]
        frame = audio.get("stereo_frame")
        if frame is None:
            frame = cell_x.new_tensor([[0.0, 1.0]]).expand(b, 2)
        inv = 1.0 / (frame[:, 1:2].float() * self.width)  # (B, 1): canvas fraction -> sigma frame widths
        cols = (torch.arange(mask_width, device=cell_x.device, dtype=torch.float32) + 0.5) / mask_width
        return {"x": cell_x.flatten(1).float(), "log_e": log_e.flatten(1)[:, None, :].float(),
                "cols": ((cols[None, :] - frame[:, 0:1].float()) * inv)[:, None, :],  # (B, 1, W_m)
                "x_scale": 1.0 / self.width, "grid": tuple(cell_x.shape[-2:])}

    def estimate(self, audio_mask_logits: torch.Tensor, shared: Dict[str, torch.Tensor]) -> torch.Tensor:
        """x̂ (B, Q) in frame coordinates from the audio masks (B, Q, T', F') and ``prepare``'s cues."""
        if audio_mask_logits.shape[-2:] != shared["grid"] or audio_mask_logits.shape[0] != shared["x"].shape[0]:
            raise ValueError(f"audio masks {tuple(audio_mask_logits.shape)} and stereo cues "
                             f"{(shared['x'].shape[0],) + shared['grid']} are on different grids")
        weights = (audio_mask_logits.flatten(2).float() + shared["log_e"]).softmax(-1)  # (B, Q, T'F')
        return torch.bmm(weights, shared["x"][..., None])[..., 0]

    def gain(self, emb: torch.Tensor) -> torch.Tensor:
        """g (B, Q) >= 0 from the normalised query embeddings (B, Q, D)."""
        return F.softplus(emb.float() @ self.gain_weight + self.gain_bias)

    def forward(self, emb: torch.Tensor, audio_mask_logits: torch.Tensor, audio: Dict[str, torch.Tensor],
                mask_width: int, shared: Optional[Dict[str, torch.Tensor]] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (bias (B, Q, 1, mask_width) to add to the mask logits, x̂ (B, Q) in frame coordinates).
        ``shared``: ``prepare(audio, mask_width)``, computed here when not given."""
        if shared is None:
            shared = self.prepare(audio, mask_width)
        x_hat = self.estimate(audio_mask_logits, shared)
        dist = shared["cols"] - (x_hat * shared["x_scale"])[..., None]  # (B, Q, W_m), in sigmas
        bias = dist.square() * (-self.gain(emb))[..., None]
        return bias.unsqueeze(2).to(emb.dtype), x_hat

    def extra_repr(self) -> str:
        return f"width={self.width}"
