"""The class-conditional prompting workflow of CPM (paper §3.2, eqs. 5-9): ACP, VCP and PCL losses.

Training only; the meta-architecture calls it once per iteration after the class-agnostic pass:

    prompt classes  K_b = non-background classes of image b's targets (its sounding classes)
    prompts         z^k = class_predictor.sample(k) (detached), padded per image to K_max
    audio           ACP on:  a_p = audio_mag + noise_mag,  ũ_a, u_a = encode_audio(log(a_p + offset))
                    ACP off: the clean audio features of the class-agnostic pass
    decode          decode(same visual features, audio, queries=z, query_padding_mask=padding)
    ACP   (eq. 5)   acp_loss(audio masks m^a_k, valid, a_i / a_p on the T' x F' grid)
    VCP   (eq. 6)   SetCriterion with the fixed assignment prompt k <-> target of class k
    PCL   (eq. 7-9) InfoNCE between masked-average-pooled u_a anchors and sampled ũ_v pixels

Every term is multiplied by MODEL.CPM.LAMBDA x the part's WEIGHT (VCP also by the class-agnostic
weight_dict: CLASS/MASK/DICE_WEIGHT) and returned under its own "loss_" key.

Decisions where the paper is silent (also in the docstrings below):
* Images without sounding classes get no prompts and contribute nothing. The decoder is still
  run (with one padded dummy prompt per image if no image has any), so every CPM loss exists
  and is a zero that is part of the graph: the set of loss keys never changes, every parameter
  the workflow touches receives a (zero) gradient, and collectives inside the criterion run on
  every rank (DDP-safe).
* The noise a_j is the mapper's "noise_mag" (INPUT.AUDIO.NOISE_SOURCE). If no input carries it,
  the audio_mag of the next image in the batch (torch.roll by one) is used; a batch of one
  without "noise_mag" cannot do that and raises.
* The mixture is part of ACP ("mix-and-separate"): with ACP disabled (Table 4, row 3) the
  prompts probe the clean audio of the class-agnostic pass, so no second audio encoding runs.
* VCP's targets are the prompted classes only, so the criterion's mask normaliser is the number
  of prompts (Mask2Former normalises by the number of matched masks; here every prompt is one).
* Prompts carry no positional embedding (query_pos = 0): they are class queries, not slots.
* PCL pools anchors over the whole batch and contrasts them with pixels of every image of the
  (local) batch: the labels are semantic classes, so a pixel of class k in another image is a
  valid positive. Features are L2-normalised (cosine similarity, pcl_loss's default).
"""
from typing import Dict, List, Tuple

import torch

from detectron2.config import configurable

from ..cpm_losses import acp_loss, acp_ratio_target, masked_average_pool, pcl_loss, sample_pixels, vcp_indices

__all__ = ["ClassConditionalPrompting"]

_WHERE = "cpm_d2/modeling/meta_arch/prompting.py"


def _where(x: dict) -> str:
    return x.get("file_name", "<no file_name>")


class ClassConditionalPrompting:
    """CPM's training-only prompting workflow (stateless: it holds settings, no parameters).

    ``__call__(model, batched_inputs, visual, audio, targets) -> Dict[str, Tensor]`` with keys
    "loss_acp" (ACP on), "loss_vcp_ce" / "loss_vcp_mask" / "loss_vcp_dice" and "_<i>" aux variants
    (VCP on), "loss_pcl" (PCL on); scalars, already weighted.
    """

    @configurable
    def __init__(
        self,
        *,
        loss_lambda: float = 1.0,
        acp_enabled: bool = True,
        acp_weight: float = 1.0,
        vcp_enabled: bool = True,
        vcp_weight: float = 1.0,
        pcl_enabled: bool = True,
        pcl_weight: float = 1.0,
        pcl_temperature: float = 0.1,
        pcl_num_pixels: int = 1024,
        background_class: int = 0,
        ignore_value: int = 255,
    ):
        """
        Args:
            loss_lambda: lambda of l = l_agn + lambda * l_CPM.
            acp_enabled / acp_weight, vcp_enabled / vcp_weight, pcl_enabled / pcl_weight: the parts.
            pcl_temperature: tau of eq. 9.
            pcl_num_pixels: pixels of ũ_v drawn per image for PCL.
            background_class: label that is never prompted (0: the background of every AVS dataset).
            ignore_value: the label maps' ignore / padding value.
        """
        if not (acp_enabled or vcp_enabled or pcl_enabled):
            raise ValueError(
                f"{_WHERE}: MODEL.CPM.ENABLED is True but MODEL.CPM.ACP/VCP/PCL.ENABLED are all False; "
                "set MODEL.CPM.ENABLED False for the class-agnostic model"
            )
        if pcl_enabled and (pcl_temperature <= 0 or pcl_num_pixels < 1):
            raise ValueError(f"{_WHERE}: MODEL.CPM.PCL.TEMPERATURE must be > 0 and NUM_PIXELS >= 1, got "
                             f"{pcl_temperature} and {pcl_num_pixels}")
        self.loss_lambda = float(loss_lambda)
        self.acp_enabled, self.acp_weight = bool(acp_enabled), float(acp_weight)
        self.vcp_enabled, self.vcp_weight = bool(vcp_enabled), float(vcp_weight)
        self.pcl_enabled, self.pcl_weight = bool(pcl_enabled), float(pcl_weight)
        self.pcl_temperature = float(pcl_temperature)
        self.pcl_num_pixels = int(pcl_num_pixels)
        self.background_class = int(background_class)
        self.ignore_value = int(ignore_value)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CPM
        if c.PCL.ENABLED and cfg.MODEL.AUDIO.PIXEL_DECODER_DIM != cfg.MODEL.SEM_SEG_HEAD.MASK_DIM:
            raise ValueError(
                f"{_WHERE}: PCL contrasts audio anchors (MODEL.AUDIO.PIXEL_DECODER_DIM = "
                f"{cfg.MODEL.AUDIO.PIXEL_DECODER_DIM}) with visual pixels (MODEL.SEM_SEG_HEAD.MASK_DIM = "
                f"{cfg.MODEL.SEM_SEG_HEAD.MASK_DIM}); the two must be equal when MODEL.CPM.PCL.ENABLED is True"
            )
        return {
            "loss_lambda": c.LAMBDA,
            "acp_enabled": c.ACP.ENABLED,
            "acp_weight": c.ACP.WEIGHT,
            "vcp_enabled": c.VCP.ENABLED,
            "vcp_weight": c.VCP.WEIGHT,
            "pcl_enabled": c.PCL.ENABLED,
            "pcl_weight": c.PCL.WEIGHT,
            "pcl_temperature": c.PCL.TEMPERATURE,
            "pcl_num_pixels": c.PCL.NUM_PIXELS,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    def __repr__(self):
        parts = [f"{n}(weight={w})" for n, on, w in (("ACP", self.acp_enabled, self.acp_weight),
                                                   ("VCP", self.vcp_enabled, self.vcp_weight),
                                                   ("PCL", self.pcl_enabled, self.pcl_weight)) if on]
        return f"ClassConditionalPrompting(lambda={self.loss_lambda}, {', '.join(parts)})"

    @staticmethod
    def check_class_predictor(class_predictor) -> None:
        """Raise if the class head cannot draw prompts (ClassPredictor.can_sample)."""
        if not getattr(class_predictor, "can_sample", False):
            raise ValueError(
                f"{_WHERE}: MODEL.CPM.ENABLED needs a class predictor that samples prompts "
                f"(GMMClassPredictor or LinearClassPredictor); {type(class_predictor).__name__} does not"
            )

    # ------------------------------------------------------------------------------ prompts
    def prompt_labels(self, targets: List[Dict[str, torch.Tensor]]) -> List[torch.Tensor]:
        """Per image the sorted non-background classes of its targets, (K_b,) int64."""
        out = []
        for t in targets:
            labels = torch.unique(t["labels"])  # sorted
            out.append(labels[labels != self.background_class].long())
        return out

    @torch.no_grad()
    def sample_prompts(self, class_predictor, prompt_labels: List[torch.Tensor], dim: int,
                       device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw z^k for every prompt label (one ``sample`` call for the batch) and pad.

        Returns prompts (B, K_max, D) (zeros at padding) and valid (B, K_max) bool;
        K_max = max(1, max_b K_b).
        """
        b = len(prompt_labels)
        counts = [int(p.numel()) for p in prompt_labels]
        k_max = max([1] + counts)
        prompts = torch.zeros(b, k_max, dim, device=device, dtype=dtype)
        valid = torch.zeros(b, k_max, dtype=torch.bool, device=device)
        if sum(counts):
            z = class_predictor.sample(torch.cat(prompt_labels).to(device)).detach().to(device=device, dtype=dtype)
            if z.shape != (sum(counts), dim):
                raise ValueError(f"{_WHERE}: {type(class_predictor).__name__}.sample returned {tuple(z.shape)}, "
                                 f"expected ({sum(counts)}, {dim})")
            for i, z_i in enumerate(torch.split(z, counts)):
                prompts[i, : counts[i]] = z_i
                valid[i, : counts[i]] = True
        return prompts, valid

    # ------------------------------------------------------------------------------ audio
    def noise_magnitudes(self, model, batched_inputs: List[dict], clean: torch.Tensor) -> torch.Tensor:
        """Off-screen noise a_j (B, Ca, T, F): the inputs' "noise_mag", else the batch's audio_mag rolled by one."""
        has = ["noise_mag" in x for x in batched_inputs]
        if all(has):
            noise = model.preprocess_audio(batched_inputs, key="noise_mag")
            if noise.shape != clean.shape:
                raise ValueError(f"{_WHERE}: 'noise_mag' {tuple(noise.shape)} and 'audio_mag' {tuple(clean.shape)} "
                                 "must have the same shape")
            return noise
        if any(has):
            missing = next(x for x, h in zip(batched_inputs, has) if not h)
            raise ValueError(f"{_WHERE}: input {_where(missing)} has no 'noise_mag' while others in its batch have one; "
                             "ACP needs all or none")
        if len(batched_inputs) < 2:
            raise ValueError(
                f"{_WHERE}: ACP needs off-screen noise but input {_where(batched_inputs[0])} has no 'noise_mag' "
                "(INPUT.AUDIO.NOISE_SOURCE = 'none'?) and the batch holds a single item, so no other clip's audio "
                "can stand in; set INPUT.AUDIO.NOISE_SOURCE or use >= 2 images per device"
            )
        return clean.roll(1, dims=0)

    # ------------------------------------------------------------------------------ losses
    def _scale(self, weight: float) -> float:
        return self.loss_lambda * weight

    def vcp_losses(self, model, outputs: Dict, targets: List[Dict], prompt_labels: List[torch.Tensor]):
        """Eq. 6: the class-agnostic criterion on the prompts with the fixed assignment prompt k <->
        the target mask of class k (final and aux layers), weighted; keys "loss_vcp_*"."""
        vcp_targets = []
        for t, labels in zip(targets, prompt_labels):
            keep = torch.isin(t["labels"], labels.to(t["labels"].device))
            vcp_targets.append({"labels": t["labels"][keep], "masks": t["masks"][keep]})
        if not model.deep_supervision:
            outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        raw = model.criterion(outputs, vcp_targets, indices=vcp_indices(prompt_labels, vcp_targets))
        s = self._scale(self.vcp_weight)
        return {"loss_vcp_" + k[len("loss_"):]: v * s for k, v in model.weight_losses(raw).items()}

    def pcl_loss(self, outputs: Dict, audio: Dict, visual, targets: List[Dict], prompt_labels, valid):
        """Eqs. 7-9: anchors f(k) pooled from u_a under the prompts' audio masks vs pixels of ũ_v."""
        if any("sem_seg" not in t for t in targets):
            raise ValueError(f"{_WHERE}: PCL needs every training input to carry 'sem_seg' (the pixel labels)")
        anchors = masked_average_pool(outputs["pred_audio_masks"], audio["feature_map"])[valid]  # (A, D)
        anchor_labels = torch.cat(prompt_labels).to(anchors.device)
        sem_seg = torch.stack([t["sem_seg"] for t in targets])
        feats, labels, _ = sample_pixels(visual[0], sem_seg, self.pcl_num_pixels, ignore_value=self.ignore_value)
        loss = pcl_loss(anchors, anchor_labels, feats, labels, temperature=self.pcl_temperature)
        return loss * self._scale(self.pcl_weight)

    def __call__(self, model, batched_inputs: List[dict], visual: Tuple[torch.Tensor, List[torch.Tensor]],
                 audio: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """
        Args:
            model: the CPM meta-architecture (its encoders, decoder, criterion and class head are used).
            batched_inputs: the mapper dicts of the batch ("audio_mag" (Ca, T, F) needed with ACP).
            visual: (ũ_v (B, MASK_DIM, Hp/4, Wp/4), multi-scale maps) of the class-agnostic pass (reused).
            audio: encode_audio output of the clean audio (used when ACP is off).
            targets: model.prepare_targets(...) output.
        Returns: the weighted CPM losses (see the class docstring).
        """
        labels = self.prompt_labels(targets)
        mask_features = visual[0]
        dim = model.transformer_decoder.hidden_dim
        prompts, valid = self.sample_prompts(model.class_predictor, labels, dim, mask_features.device,
                                             mask_features.dtype)
        losses = {}
        if self.acp_enabled:
            clean = model.preprocess_audio(batched_inputs, key="audio_mag")
            noise = self.noise_magnitudes(model, batched_inputs, clean)
            audio = model.encode_audio(torch.log(clean + noise + model.audio_log_offset))
        outputs = model.decode(visual, audio, queries=prompts, query_padding_mask=~valid)
        if self.acp_enabled:
            audio_masks = outputs["pred_audio_masks"]
            target = acp_ratio_target(clean, noise, audio_masks.shape[-2:])
            losses["loss_acp"] = acp_loss(audio_masks, valid, target) * self._scale(self.acp_weight)
        if self.vcp_enabled:
            losses.update(self.vcp_losses(model, outputs, targets, labels))
        if self.pcl_enabled:
            losses["loss_pcl"] = self.pcl_loss(outputs, audio, visual, targets, labels, valid)
        return losses
