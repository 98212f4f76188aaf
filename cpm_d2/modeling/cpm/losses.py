"""Loss functions of the CPM training stage (paper §3.2, eqs. 5-9); pure functions, no model state.

* ACP (eq. 5):  :func:`acp_ratio_target`, :func:`acp_loss`
* PCL (eqs. 7-9): :func:`masked_average_pool`, :func:`sample_pixels` (:func:`sample_pixel_slots`), :func:`pcl_loss`
* VCP (eq. 6) reuses the class-agnostic criterion with fixed assignments: :func:`vcp_indices`
"""
from collections.abc import Mapping
from typing import List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

__all__ = [
    "acp_ratio_target",
    "acp_loss",
    "masked_average_pool",
    "pcl_loss",
    "sample_pixels",
    "sample_pixel_slots",
    "vcp_indices",
]


def _resize_2d(x: torch.Tensor, out_size: Tuple[int, int]) -> torch.Tensor:
    """(B, 1, T, F) -> (B, 1, T', F'): area averaging when shrinking both axes, else bilinear."""
    out_size = (int(out_size[0]), int(out_size[1]))
    if tuple(x.shape[-2:]) == out_size:
        return x
    if out_size[0] <= x.shape[-2] and out_size[1] <= x.shape[-1]:
        return F.interpolate(x, size=out_size, mode="area")
    return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------ ACP
@torch.no_grad()
def acp_ratio_target(clean_mag: torch.Tensor, noise_mag: torch.Tensor, out_size: Sequence[int],
                     check_sign: bool = True) -> torch.Tensor:
    """Ratio mask a_i / a_p of eq. 5 on the audio-mask grid.

    Args:
        clean_mag: (B, Ca, T, F) or (Ca, T, F) non-negative magnitude a_i of the clip's own audio.
        noise_mag: same shape, magnitude a_j of the off-screen noise; the mixture is a_p = a_i + a_j.
        out_size: (T', F') of the predicted audio masks.
        check_sign: raise on negative magnitudes (a host-device sync on a GPU); False when the
            caller has checked them (the model does, where its inputs enter).
    Returns:
        (B, T', F') (or (T', F') for 3-D input) in [0, 1].

    The audio masks are single-channel, so the channels are pooled magnitude-weighted:
    sum_ch a_i / sum_ch a_p. Resizing is applied to numerator and denominator (area average when
    shrinking, bilinear otherwise) before dividing, so every output cell is the share of the clean
    magnitude in the mixture magnitude over its area. Cells with a_p = 0 (0/0: silence in both
    signals) get target 0: there is no on-screen sound to recover there.
    """
    if clean_mag.shape != noise_mag.shape or clean_mag.dim() not in (3, 4):
        raise ValueError(
            f"acp_ratio_target expects clean_mag and noise_mag of the same (B, Ca, T, F) or "
            f"(Ca, T, F) shape, got {tuple(clean_mag.shape)} and {tuple(noise_mag.shape)}"
        )
    if len(out_size) != 2:
        raise ValueError(f"out_size must be (T', F'), got {out_size!r}")
    if check_sign and (bool((clean_mag < 0).any()) or bool((noise_mag < 0).any())):
        raise ValueError(f"acp_ratio_target got negative magnitudes (pass linear magnitudes, not logs)")
    squeeze = clean_mag.dim() == 3
    if squeeze:
        clean_mag, noise_mag = clean_mag[None], noise_mag[None]
    clean = clean_mag.float().sum(1, keepdim=True)
    mixture = clean + noise_mag.float().sum(1, keepdim=True)
    clean = _resize_2d(clean, out_size)[:, 0]
    mixture = _resize_2d(mixture, out_size)[:, 0]
    ratio = torch.where(mixture > 0, clean / mixture.clamp_min(torch.finfo(mixture.dtype).tiny), 0.0)
    ratio = ratio.clamp(0.0, 1.0)
    return ratio[0] if squeeze else ratio


def acp_loss(audio_mask_logits: torch.Tensor, prompt_valid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 5: mean squared error between sigma(sum_k m^a_k) and the ratio target.

    Args:
        audio_mask_logits: (B, K, T', F') audio mask logits m^a_k of the K prompts of each image
            (padded to a common K).
        prompt_valid: (B, K) bool, True for real prompts; padded ones are excluded from the sum.
        target: (B, T', F') ratio mask from :func:`acp_ratio_target`.
    Returns:
        scalar: per image mean over T'xF' of (sigma(sum_valid m_k) - target)^2, averaged over the
        images that have at least one valid prompt; 0 (still attached to the graph) if none has.
        The paper writes ||.||_2 but names it MSE; we use the mean squared error.
    """
    if audio_mask_logits.dim() != 4:
        raise ValueError(f"audio_mask_logits must be (B, K, T', F'), got {tuple(audio_mask_logits.shape)}")
    B, K, T, Fq = audio_mask_logits.shape
    if tuple(prompt_valid.shape) != (B, K):
        raise ValueError(f"prompt_valid must be (B, K) = {(B, K)}, got {tuple(prompt_valid.shape)}")
    if tuple(target.shape) != (B, T, Fq):
        raise ValueError(f"target must be (B, T', F') = {(B, T, Fq)}, got {tuple(target.shape)}")
    valid = prompt_valid.to(device=audio_mask_logits.device, dtype=torch.bool)
    logits = audio_mask_logits.float()
    summed = torch.where(valid[:, :, None, None], logits, torch.zeros_like(logits)).sum(1)  # (B, T', F')
    per_image = (summed.sigmoid() - target.to(summed)).pow(2).flatten(1).mean(1)  # (B,)
    has = valid.any(1)
    per_image = torch.where(has, per_image, torch.zeros_like(per_image))
    return per_image.sum() / has.sum().clamp_min(1)


# ------------------------------------------------------------------------------------------ PCL
def masked_average_pool(saliency_logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Eq. 7: class anchors f(k) by masked average pooling of the audio features.

    Args:
        saliency_logits: (B, K, T', F') audio mask logits m^a_k.
        features: (B, D, T', F') audio feature map u_a.
    Returns:
        (B, K, D). s = sigma(m) is binarised as s > mean(s) over T'xF' (per prompt); f(k) is the mean
        of the features inside. When the binary mask is empty (constant saliency) the mean over all
        positions is used. The threshold carries no gradient; gradients flow into ``features``.
    """
    if saliency_logits.dim() != 4 or features.dim() != 4:
        raise ValueError(
            f"masked_average_pool expects (B, K, T', F') logits and (B, D, T', F') features, got "
            f"{tuple(saliency_logits.shape)} and {tuple(features.shape)}"
        )
    if saliency_logits.shape[0] != features.shape[0] or saliency_logits.shape[-2:] != features.shape[-2:]:
        raise ValueError(
            f"masked_average_pool needs the same batch and T'xF' grid, got "
            f"{tuple(saliency_logits.shape)} and {tuple(features.shape)}"
        )
    s = saliency_logits.detach().float().sigmoid().flatten(2)  # (B, K, N)
    mask = (s > s.mean(-1, keepdim=True)).to(features.dtype)
    mask = torch.where(mask.sum(-1, keepdim=True) > 0, mask, torch.ones_like(mask))
    pooled = torch.einsum("bkn,bdn->bkd", mask, features.flatten(2))
    return pooled / mask.sum(-1, keepdim=True)


def sample_pixels(
    pixel_feats: torch.Tensor,
    sem_seg: torch.Tensor,
    num_pixels: int,
    generator: Optional[torch.Generator] = None,
    ignore_value: int = 255,
):
    """Class-balanced random pixels of the visual feature map for the contrastive set of eq. 8.

    Args:
        pixel_feats: (B, D, H, W) per-pixel features u_v.
        sem_seg: (B, H', W') labels (``ignore_value`` = ignore/padding); resized to (H, W) by nearest.
        num_pixels: pixels drawn per image (all valid ones if fewer).
        generator: optional torch.Generator (its device is used for the draws).
    Returns:
        (feats (P, D), labels (P,) long, image_index (P,) long), concatenated over images.
        Within an image pixels are drawn without replacement with probability proportional to
        1 / (pixels of their class in that image) (Gumbel top-k), so every present class gets about
        the same share and small classes (e.g. the anchors' sounding objects) are not missed.
        Only the indices are drawn without gradient; the returned features keep their graph.
        :func:`sample_pixel_slots` draws the same without data-dependent shapes.
    """
    feats, labels, images, valid = sample_pixel_slots(pixel_feats, sem_seg, num_pixels, None, generator, ignore_value)
    return feats[valid], labels[valid], images[valid]


def sample_pixel_slots(
    pixel_feats: torch.Tensor,
    sem_seg: torch.Tensor,
    num_pixels: int,
    num_classes: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    ignore_value: int = 255,
):
    """:func:`sample_pixels` with min(num_pixels, H W) slots per image, each valid or not (an image
    with fewer valid pixels fills the rest with invalid slots): (feats (B k, D), labels (B k,),
    image_index (B k,), valid (B k,) bool). With ``num_classes`` (labels in [0, num_classes)
    besides ``ignore_value``, checked by the caller) nothing is read back to the host; None reads
    the largest label and checks for negative ones (host-device syncs on a GPU)."""
    if pixel_feats.dim() != 4 or sem_seg.dim() != 3 or pixel_feats.shape[0] != sem_seg.shape[0]:
        raise ValueError(
            f"sample_pixels expects pixel_feats (B, D, H, W) and sem_seg (B, H', W'), got "
            f"{tuple(pixel_feats.shape)} and {tuple(sem_seg.shape)}"
        )
    B, D, H, W = pixel_feats.shape
    with torch.no_grad():
        image_index, pixel_index, labels, valid = _sample_pixel_indices(
            sem_seg, (B, H, W), num_pixels, num_classes, generator, ignore_value, pixel_feats.device
        )
    feats = pixel_feats.flatten(2)[image_index, :, pixel_index]  # (P, D), keeps the graph
    return feats, labels[image_index, pixel_index], image_index, valid


def _sample_pixel_indices(sem_seg, shape, num_pixels, num_classes, generator, ignore_value, dev):
    B, H, W = shape
    labels = F.interpolate(sem_seg[:, None].float(), size=(H, W), mode="nearest")[:, 0].long().flatten(1)
    labels = labels.to(dev)
    valid = labels != ignore_value
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    if num_classes is None:
        if bool((safe < 0).any()):
            raise ValueError(f"sample_pixels got negative labels other than ignore_value={ignore_value}")
        num_classes = int(safe.max()) + 1 if safe.numel() else 1
    counts = torch.zeros(B, num_classes, device=dev).scatter_add_(1, safe, valid.float())
    weight = torch.where(valid, counts.gather(1, safe).clamp_min(1).reciprocal(), torch.zeros_like(counts[:, :1]))
    draw_dev = generator.device if generator is not None else dev
    u = torch.rand(B, H * W, generator=generator, device=draw_dev).to(dev)
    gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1.0 - 1e-7)))
    keys = torch.where(valid, weight.log() + gumbel, torch.full_like(gumbel, float("-inf")))
    k = min(int(num_pixels), H * W)
    top, idx = keys.topk(k, dim=1)
    image_index = torch.arange(B, device=dev)[:, None].expand(B, k).flatten()
    return image_index, idx.flatten(), labels, torch.isfinite(top).flatten()


def _pcl_loss_impl(anchors, anchor_labels, pixel_feats, pixel_labels, temperature, normalize, pairs):
    a = anchors.float()
    p = pixel_feats.float()
    if normalize:
        a = F.normalize(a, dim=-1)
        p = F.normalize(p, dim=-1)
    logits = a @ p.t() / temperature  # (A, P)
    pos = anchor_labels.to(logits.device)[:, None] == pixel_labels.to(logits.device)[None, :]
    neg = ~pos
    if pairs is not None:  # pairs across images / with invalid pixels are neither positives nor negatives
        pos, neg = pos & pairs, neg & pairs
    very_negative = torch.finfo(logits.dtype).min  # finite, so rows without negatives give no NaN grads
    neg_lse = torch.logsumexp(logits.masked_fill(~neg, very_negative), dim=1, keepdim=True)  # (A, 1)
    has_neg = neg.any(1, keepdim=True)
    neg_lse = torch.where(has_neg, neg_lse, torch.full_like(neg_lse, float("-inf")))
    # -log(e^s / (e^s + sum_n e^n)) = logaddexp(s, lse_n) - s, for every (anchor, positive) pair
    per_pair = torch.logaddexp(logits, neg_lse) - logits
    per_pair = torch.where(pos, per_pair, torch.zeros_like(per_pair))
    n_pos = pos.sum(1)
    per_anchor = per_pair.sum(1) / n_pos.clamp_min(1)
    has_pos = n_pos > 0
    per_anchor = torch.where(has_pos, per_anchor, torch.zeros_like(per_anchor))
    return per_anchor.sum() / has_pos.sum().clamp_min(1)


def pcl_loss(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    pixel_feats: torch.Tensor,
    pixel_labels: torch.Tensor,
    temperature: float = 0.1,
    normalize: bool = True,
    anchor_images: Optional[torch.Tensor] = None,
    pixel_images: Optional[torch.Tensor] = None,
    pixel_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eq. 9: supervised InfoNCE between audio anchors and visual pixel features.

    Args:
        anchors: (A, D) anchors f(k) (e.g. :func:`masked_average_pool`, flattened over images).
        anchor_labels: (A,) class of each anchor.
        pixel_feats: (P, D) pixel features u_v(omega) (e.g. :func:`sample_pixels`).
        pixel_labels: (P,) class of each pixel.
        temperature: tau.
        normalize: L2-normalise anchors and pixels first (cosine similarity; standard for InfoNCE
            with tau = 0.1). False uses the raw dot product f . f_p as written in eq. 9.
        anchor_images, pixel_images: optional (A,) / (P,) image index of each anchor / pixel: an
            anchor's positives and negatives are then the pixels of its own image only ("image"
            negatives). Without them every pixel of the batch takes part ("batch" negatives).
        pixel_valid: optional (P,) bool; invalid pixels take no part (:func:`sample_pixel_slots`).
    Returns:
        scalar: for each anchor f with at least one positive (pixel of the same class),
        mean over its positives p of -log(e^{f.p/tau} / (e^{f.p/tau} + sum_n e^{f.n/tau})) with n
        running over its negatives (pixels of other classes); then the mean over those anchors.
        Anchors without positives are skipped; 0 (attached to the graph) if no anchor has one.
    """
    if anchors.dim() != 2 or pixel_feats.dim() != 2 or anchors.shape[1] != pixel_feats.shape[1]:
        raise ValueError(
            f"pcl_loss expects anchors (A, D) and pixel_feats (P, D), got "
            f"{tuple(anchors.shape)} and {tuple(pixel_feats.shape)}"
        )
    if anchor_labels.shape != anchors.shape[:1] or pixel_labels.shape != pixel_feats.shape[:1]:
        raise ValueError(
            f"pcl_loss labels must be (A,) and (P,), got {tuple(anchor_labels.shape)} and "
            f"{tuple(pixel_labels.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"pcl_loss temperature must be > 0, got {temperature}")
    if (anchor_images is None) != (pixel_images is None):
        raise ValueError(f"pcl_loss needs both anchor_images and pixel_images, or neither")
    pairs = None
    if anchor_images is not None:
        if anchor_images.shape != anchor_labels.shape or pixel_images.shape != pixel_labels.shape:
            raise ValueError(f"anchor_images / pixel_images must be (A,) / (P,), got "
                             f"{tuple(anchor_images.shape)} and {tuple(pixel_images.shape)}")
        pairs = anchor_images.to(anchors.device)[:, None] == pixel_images.to(anchors.device)[None, :]
    if pixel_valid is not None:
        if pixel_valid.shape != pixel_labels.shape:
            raise ValueError(f"pixel_valid must be (P,), got {tuple(pixel_valid.shape)}")
        valid = pixel_valid.to(anchors.device, torch.bool)[None, :]
        pairs = valid if pairs is None else pairs & valid
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        return _pcl_loss_impl(anchors, anchor_labels, pixel_feats, pixel_labels, float(temperature), normalize,
                              pairs)


# ------------------------------------------------------------------------------------------ VCP
def _target_labels(target) -> torch.Tensor:
    if isinstance(target, Mapping):
        return target["labels"]
    if hasattr(target, "gt_classes"):  # detectron2 Instances
        return target.gt_classes
    if isinstance(target, torch.Tensor):
        return target
    raise TypeError(
        f"vcp_indices targets must be dicts with 'labels', Instances with gt_classes or label "
        f"tensors, got {type(target).__name__}"
    )


def vcp_indices(prompt_labels: List[torch.Tensor], targets) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Fixed assignment for VCP (eq. 6): prompt k of image b -> the target whose label is its class.

    Args:
        prompt_labels: per image, (K_b,) long class of each class-conditional prompt (prompt k is
            query k of that image's prompt set).
        targets: per image, a dict with "labels" (T_b,) (the criterion's targets), detectron2
            Instances with ``gt_classes``, or the label tensor itself.
    Returns:
        per image (query_idx (n,), target_idx (n,)) int64 CPU tensors: the format of the Hungarian
        matcher, to pass to the criterion instead of matching. If several targets share a label
        the first is used; prompts whose class has no target are left unassigned (the criterion
        then treats them as no-object).
    """
    if len(prompt_labels) != len(targets):
        raise ValueError(
            f"vcp_indices got {len(prompt_labels)} prompt label sets but {len(targets)} targets"
        )
    out = []
    for labels, target in zip(prompt_labels, targets):
        tl = _target_labels(target).detach().cpu().long()
        pl = labels.detach().cpu().long().reshape(-1)
        eq = pl[:, None] == tl[None, :]  # (K_b, T_b)
        has = eq.any(1)
        first = eq.to(torch.uint8).argmax(1) if tl.numel() else torch.zeros_like(pl)
        out.append((torch.nonzero(has).reshape(-1), first[has]))
    return out
