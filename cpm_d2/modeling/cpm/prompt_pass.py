"""``PromptPass``: what CPM adds to a training forward (paper §3.2), around ONE decoder pass.

    labels   per image the sorted non-background classes of its targets that the class head can
             prompt (one read of the head's promptable classes per step); validity (B, K), prompt
             and VCP indices built on the host and moved to the device once
    prompts  z^k = class_predictor.sample(k) (GMM: a draw from class k's mixture of the last
             iteration; linear head: the learnable "Point Rep." row), padded to (B, K, D)
    audio    with ACP, a_p = a_i + a_j (a_j: the inputs' "noise_audio", else the next clip of the
             batch); the audio branch encodes [a_i; a_p] (2B) at once, each half normalised by its
             own batch statistics and only a_i updating BatchNorm's running ones (split_batch_norm)
    decode   one pass over the query groups [N class-agnostic queries on a_i | K prompts on a_i
             (VCP; with ACP and VCP.AUDIO "clean") | K prompts on a_p (ACP)]; without ACP a single
             prompt group hears a_i, with VCP.AUDIO "mixture" a single one hears a_p
    heads    class logits for the queries and VCP's prompts (every prediction), audio masks for
             the prompts ACP / PCL read (final prediction), no mask logits no loss reads

The class-agnostic queries' outputs are the baseline's; the prompts' go to ``CPMLoss`` as a
:class:`PromptBatch`. Nothing here reads a device tensor back to the host except the promptable
classes (one (C,) read per step, and none for heads whose prompts are always available).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.profiler import record_function

from detectron2.config import configurable

from ..transformer_decoder.query_groups import QueryGroup
from .batchnorm import split_batch_norm
from .losses import vcp_indices

__all__ = ["PromptPass", "PromptBatch", "CLEAN", "MIXTURE"]

CLEAN, MIXTURE = 0, 1  # indices of the audio dicts of the pass
BACKGROUND = 0  # the background class of every AVS dataset: never prompted


def _where(x: dict) -> str:
    return x.get("file_name", "<no file_name>")


@dataclass
class PromptBatch:
    """One step's prompts as ``CPMLoss`` reads them (B images, K prompt slots, A real prompts).

    labels (A,) int64: class of each prompt, row-major over ``valid``; valid (B, K) bool;
    image_index / slot_index (A,) int64: the image and slot of each prompt (device);
    vcp_indices: per image (prompt slots, target indices) int64 on the host, VCP's fixed assignment;
    outputs: the decoder outputs of the prompts ACP and PCL read ("pred_audio_masks" when they are on);
    vcp_outputs: those VCP reads (``outputs`` itself unless VCP hears a_i and ACP a_p);
    audio_features: u_a (B, D_a, T', F') of the audio ``outputs`` heard;
    clean_audio / noise_audio: (B, Ca, T, F) linear magnitudes a_i / a_j (None without ACP);
    host_labels (A,) int64: ``labels`` on the host (for the class head's banks).
    """

    labels: torch.Tensor
    valid: torch.Tensor
    image_index: torch.Tensor
    slot_index: torch.Tensor
    vcp_indices: List[Tuple[torch.Tensor, torch.Tensor]]
    outputs: Dict
    vcp_outputs: Dict
    audio_features: torch.Tensor
    clean_audio: Optional[torch.Tensor] = None
    noise_audio: Optional[torch.Tensor] = None
    host_labels: Optional[torch.Tensor] = None


class PromptPass(nn.Module):
    """CPM's prompt pass (module docstring); no parameters of its own.

    forward(model, batched_inputs, target_labels, magnitudes, stereo_frame, visual) ->
    (class-agnostic outputs, PromptBatch); ``model`` is the CPM meta-architecture whose class head,
    audio branch and decoder it runs.
    """

    @configurable
    def __init__(self, *, num_classes: int, acp: bool = True, vcp: bool = True, pcl: bool = True,
                 vcp_audio: str = "clean"):
        super().__init__()
        if vcp_audio not in ("mixture", "clean"):
            raise ValueError(f"MODEL.CPM.VCP.AUDIO must be 'mixture' or 'clean', got {vcp_audio!r}")
        self.num_classes = int(num_classes)
        self.acp, self.vcp, self.pcl = bool(acp), bool(vcp), bool(pcl)
        self.vcp_audio = vcp_audio

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CPM
        return {"num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, "acp": c.ACP.ENABLED, "vcp": c.VCP.ENABLED,
                "pcl": c.PCL.ENABLED, "vcp_audio": c.VCP.AUDIO}

    def extra_repr(self) -> str:
        return f"acp={self.acp}, vcp={self.vcp}, pcl={self.pcl}, vcp_audio={self.vcp_audio}"

    @property
    def vcp_group(self) -> bool:
        """Whether VCP's prompts are a group of their own on a_i (ACP's hear a_p)."""
        return self.acp and self.vcp and self.vcp_audio == "clean"

    # ------------------------------------------------------------------------------ labels
    def promptable(self, class_predictor: nn.Module) -> torch.Tensor:
        """(C,) bool on the host: the classes ``class_predictor`` can prompt now (one read per step)."""
        return class_predictor.can_prompt(torch.arange(self.num_classes)).cpu()

    def prompt_labels(self, target_labels: List[torch.Tensor], promptable: torch.Tensor) -> List[torch.Tensor]:
        """Per image the sorted non-background classes of its target labels (host, (T_b,)) that
        ``promptable`` (C,) allows, (K_b,) int64 on the host."""
        out = []
        for labels in target_labels:
            labels = torch.unique(labels.long())  # sorted
            labels = labels[labels != BACKGROUND]
            out.append(labels[promptable[labels]])
        return out

    def plan(self, prompt_labels: List[torch.Tensor], target_labels: List[torch.Tensor], device) -> Dict:
        """Host-built index tensors of the prompts, moved to ``device`` in one copy: "labels",
        "image_index", "slot_index" (A,), "valid" (B, K), K = max(1, max_b K_b); "flat_labels"
        (A,) stays on the host (for the class head's ``sample``) and "vcp_indices" too."""
        counts = [int(p.numel()) for p in prompt_labels]
        b, k = len(counts), max([1] + counts)
        flat = torch.cat(prompt_labels) if prompt_labels else torch.zeros(0, dtype=torch.long)
        image = torch.repeat_interleave(torch.arange(b), torch.tensor(counts, dtype=torch.long))
        slot = torch.cat([torch.arange(n) for n in counts]) if counts else torch.zeros(0, dtype=torch.long)
        valid = torch.zeros(b, k, dtype=torch.long)
        valid[image, slot] = 1
        a = flat.numel()
        packed = torch.cat([flat, image, slot, valid.flatten()]).to(device)
        return {"labels": packed[:a], "image_index": packed[a:2 * a], "slot_index": packed[2 * a:3 * a],
                "valid": packed[3 * a:].view(b, k).bool(), "flat_labels": flat,
                "vcp_indices": vcp_indices(prompt_labels, target_labels)}

    def sample(self, class_predictor: nn.Module, plan: Dict, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """One ``class_predictor.sample`` call for the batch -> prompts (B, K, D), zeros at padding;
        learnable prompts keep their graph."""
        valid = plan["valid"]
        prompts = torch.zeros(*valid.shape, dim, device=valid.device, dtype=dtype)
        flat = plan["flat_labels"]
        if flat.numel() == 0:
            return prompts
        z = class_predictor.sample(flat)
        if z.shape != (flat.numel(), dim):
            raise ValueError(f"{type(class_predictor).__name__}.sample returned {tuple(z.shape)} for "
                             f"{flat.numel()} labels, expected ({flat.numel()}, {dim})")
        # out of place: keeps z's graph
        return prompts.index_put((plan["image_index"], plan["slot_index"]), z.to(valid.device, dtype))

    # ------------------------------------------------------------------------------ audio
    def noise_magnitudes(self, model: nn.Module, batched_inputs: List[dict], clean: torch.Tensor) -> torch.Tensor:
        """Off-screen noise a_j (B, Ca, T, F): the inputs' "noise_audio", else the next clip of the batch."""
        has = ["noise_audio" in x for x in batched_inputs]
        if all(has):
            noise = model.preprocess_audio(batched_inputs, key="noise_audio")
            if noise.shape != clean.shape:
                raise ValueError(f"'noise_audio' {tuple(noise.shape)} and 'audio' {tuple(clean.shape)} of the "
                                 "inputs must have the same shape (the mapper's INPUT.AUDIO settings)")
            return noise
        if any(has):
            missing = next(x for x, h in zip(batched_inputs, has) if not h)
            raise ValueError(f"input {_where(missing)} has no 'noise_audio' while others in its batch have one; "
                             "ACP needs all or none")
        if len(batched_inputs) < 2:
            raise ValueError(
                f"ACP needs off-screen noise but input {_where(batched_inputs[0])} has no 'noise_audio' "
                "(INPUT.AUDIO.NOISE_SOURCE 'batch') and the batch holds a single item, so no other clip's audio "
                "can stand in; set INPUT.AUDIO.NOISE_SOURCE to 'dataset' or use >= 2 images per device"
            )
        return clean.roll(1, dims=0)

    def encode_audio(self, model: nn.Module, clean: torch.Tensor, noise: Optional[torch.Tensor],
                     stereo_frame: Optional[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        """[audio dict of a_i] or, with noise a_j, [a_i's, a_p = a_i + a_j's] from ONE pass of the
        audio branch over [a_i; a_p] (2B), BatchNorm split per half (split_batch_norm)."""
        if noise is None:
            return [model.audio_features(clean, stereo_frame)]
        b = clean.shape[0]
        frame = None if stereo_frame is None else torch.cat([stereo_frame, stereo_frame])
        with split_batch_norm(model.audio_backbone, model.audio_pixel_decoder, clean=b):
            both = model.audio_features(torch.cat([clean, clean + noise]), frame)
        return [{k: v[:b] for k, v in both.items()}, {k: v[b:] for k, v in both.items()}]

    # ------------------------------------------------------------------------------ the pass
    def groups(self, prompts: torch.Tensor, padding: torch.Tensor) -> List[QueryGroup]:
        """[class-agnostic queries, prompt group(s)] (module docstring); ``padding`` (B, K) True = padded."""
        queries = QueryGroup(audio=CLEAN)
        audio_masks = "final" if (self.acp or self.pcl) else "none"
        if self.vcp_group:
            return [queries, QueryGroup(prompts, padding_mask=padding, audio=CLEAN),
                    QueryGroup(prompts, padding_mask=padding, audio=MIXTURE, classify=False, masks=False,
                               audio_masks=audio_masks)]
        return [queries, QueryGroup(prompts, padding_mask=padding, audio=MIXTURE if self.acp else CLEAN,
                                    classify=self.vcp, masks=self.vcp, audio_masks=audio_masks)]

    @record_function("cpm.prompt_pass")
    def forward(self, model: nn.Module, batched_inputs: List[dict], target_labels: List[torch.Tensor],
                magnitudes: torch.Tensor, stereo_frame: Optional[torch.Tensor],
                visual: Tuple[torch.Tensor, List[torch.Tensor]]) -> Tuple[Dict, PromptBatch]:
        """
        Args:
            target_labels: per image its targets' classes (T_b,) int64 on the host.
            magnitudes: (B, Ca, T, F) clean linear magnitudes a_i; stereo_frame (B, 2) or None.
            visual: (u~_v, multi-scale maps) of ``model.encode_visual``.
        Returns: the class-agnostic queries' outputs (the baseline's decoder outputs) and the
        :class:`PromptBatch` of the prompts.
        """
        head = model.class_predictor
        with record_function("cpm.prompt_labels"):
            labels = self.prompt_labels(target_labels, self.promptable(head))
            plan = self.plan(labels, target_labels, magnitudes.device)
            prompts = self.sample(head, plan, model.transformer_decoder.hidden_dim, visual[0].dtype)
        noise = self.noise_magnitudes(model, batched_inputs, magnitudes) if self.acp else None
        audios = self.encode_audio(model, magnitudes, noise, stereo_frame)
        groups = self.groups(prompts, ~plan["valid"])
        queries, *prompted = model.decode_groups(visual, audios, groups)
        return queries, PromptBatch(
            labels=plan["labels"], valid=plan["valid"], image_index=plan["image_index"],
            slot_index=plan["slot_index"], vcp_indices=plan["vcp_indices"], outputs=prompted[-1],
            vcp_outputs=prompted[0], audio_features=audios[groups[-1].audio]["feature_map"],
            clean_audio=magnitudes if self.acp else None, noise_audio=noise, host_labels=plan["flat_labels"])
