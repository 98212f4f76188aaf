"""Query groups: several sets of queries decoded side by side in one decoder pass.

The way DN-DETR, DINO and MP-Former decode their denoising queries beside the matching ones:
the groups are concatenated along the query axis, Q = sum_g Q_g, and

* self-attention is block-diagonal: a query attends only the (non-padded) queries of its own
  group (:func:`self_attention_mask`, plus each group's key padding);
* audio cross-attention: every group hears one audio (index ``QueryGroup.audio``); the audios'
  tokens are concatenated along the key axis and each query sees only its own audio's
  (:func:`audio_memory`);
* the visual masked cross-attention is per query already.

So every group's result is the one it would get decoded alone. The heads run only over the
groups that ask for them (:func:`runs`: contiguous stretches of such groups, one call each).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["QueryGroup", "AUDIO_MASKS", "runs", "per_group", "cat", "self_attention_mask", "audio_memory"]

AUDIO_MASKS = ("none", "final", "all")


@dataclass
class QueryGroup:
    """One set of queries of a grouped decoder pass.

    queries / query_pos: (B, Q_g, D) custom queries (None: the decoder's N learnable ones; query_pos
        None with custom queries: no positional embedding).
    padding_mask: (B, Q_g) bool, True = padding (never a self-attention key).
    audio: index of the audio (in the pass's list of audio dicts) this group hears.
    classify: class logits where a single-group pass computes them (every prediction in training;
        the last audio and the final prediction at inference); False: never.
    masks: mask logits at the final prediction (the earlier ones are always computed: the next
        layer's attention mask is made from them).
    audio_masks: "none", "final" (the final prediction) or "all" (every prediction).
    """

    queries: Optional[torch.Tensor] = None
    query_pos: Optional[torch.Tensor] = None
    padding_mask: Optional[torch.Tensor] = None
    audio: int = 0
    classify: bool = True
    masks: bool = True
    audio_masks: str = "none"

    def __post_init__(self):
        if self.audio_masks not in AUDIO_MASKS:
            raise ValueError(f"QueryGroup.audio_masks must be one of {AUDIO_MASKS}, got {self.audio_masks!r}")


def runs(sizes: Sequence[int], wanted: Sequence[bool], key: Optional[Sequence] = None
         ) -> List[Tuple[int, int, List[int]]]:
    """Contiguous stretches of wanted groups (with equal ``key``, when given) as (start, end, group
    indices) along the concatenated query axis; groups of size 0 are skipped."""
    out, start = [], 0
    for g, (n, want) in enumerate(zip(sizes, wanted)):
        end = start + n
        if want and n:
            if out and out[-1][1] == start and (key is None or key[out[-1][2][-1]] == key[g]):
                out[-1] = (out[-1][0], end, out[-1][2] + [g])
            else:
                out.append((start, end, [g]))
        start = end
    return out


def per_group(values: Sequence[torch.Tensor], stretches, offsets: Sequence[int], sizes: Sequence[int]
              ) -> Dict[int, torch.Tensor]:
    """{group index: its slice along dim 1} of ``values``, one tensor (B, end - start, ...) per
    stretch of :func:`runs`."""
    out = {}
    for value, (start, _, groups) in zip(values, stretches):
        for g in groups:
            a = offsets[g] - start
            out[g] = value if (a == 0 and sizes[g] == value.shape[1]) else value[:, a:a + sizes[g]]
    return out


def cat(tensors: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """torch.cat that returns a single tensor as it is (no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim=dim)


def self_attention_mask(sizes: Sequence[int], device) -> Optional[torch.Tensor]:
    """(Q, Q) bool, True = blocked: the queries of different groups; None for one group."""
    if len(sizes) < 2:
        return None
    gid = torch.cat([torch.full((n,), g, dtype=torch.int32, device=device) for g, n in enumerate(sizes)])
    return gid[:, None] != gid[None, :]


def audio_memory(audios: Sequence[Dict[str, torch.Tensor]], sizes: Sequence[int], sources: Sequence[int]):
    """The audio cross-attention's keys for groups of ``sizes`` hearing ``sources``: (tokens
    (B, S, D), positions (B, S, D) or None, mask (Q, S) bool True = blocked, or None). One audio
    heard: its own tokens, no mask; else every heard audio's tokens concatenated along the keys."""
    used = sorted(set(sources))
    if len(used) == 1:
        a = audios[used[0]]
        return a["tokens"], a.get("tokens_pos"), None
    tokens = torch.cat([audios[s]["tokens"] for s in used], dim=1)
    pos = None
    if all(audios[s].get("tokens_pos") is not None for s in used):
        pos = torch.cat([audios[s]["tokens_pos"] for s in used], dim=1)
    device = tokens.device
    key_src = torch.cat([torch.full((audios[s]["tokens"].shape[1],), s, dtype=torch.int32, device=device)
                         for s in used])
    query_src = torch.cat([torch.full((n,), s, dtype=torch.int32, device=device) for n, s in zip(sizes, sources)])
    return tokens, pos, query_src[:, None] != key_src[None, :]
