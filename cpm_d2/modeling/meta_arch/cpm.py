"""Meta-architecture "CPM": an audio-visual Mask2Former trained with class-conditional prompting.

    images  --backbone--> {res2..res5} --pixel decoder--> u~_v (B, MASK_DIM, H/4, W/4) + 3 scales
    audio magnitude --log--> audio backbone --> {res2..res5} --audio pixel decoder--> tokens, u~_a, u_a
    N learnable queries --AudioVisualTransformerDecoder--> per-layer class logits / masks

Training = l_agn (the class-agnostic path of the paper's §3.1: Hungarian matching, CE + focal +
dice at every prediction) and, with MODEL.CPM.ENABLED, CPM's prompting losses (§3.2). The prompt
pass (modeling/cpm/prompt_pass.py) then takes the place of the audio encoding and the decode:

    prompts      z^k = class_predictor.sample(k) for each image's ground-truth classes, drawn from
                 the class predictor of the last iteration (before this step's observe)
    ACP audio    a_p = a_i + a_j (a_j off-screen noise from the mapper, or the next clip of the
                 batch); the audio branch encodes [a_i; a_p] at once (BatchNorm split per half)
    decode       ONE decoder pass: [N queries on a_i | K prompts on a_i (VCP) | K prompts on a_p
                 (ACP)], no group seeing another
    losses       l_agn from the queries' outputs; CPMLoss (ACP, VCP, PCL) from the prompts'

With MODEL.AUDIO.STEREO_POSITION.ENABLED (transformer_decoder/stereo_position.py) every audio
dict also carries the inter-channel level-difference cues of its magnitudes (clean or mixed) and
where each image's audio frame lies on the padded canvas; the decoder turns them into a
per-query column prior on the masks.

Inference is the class-agnostic path either way, so CPM costs nothing at test time. With
MODEL.CPM.ENABLED False the model is the plain audio-visual Mask2Former (the baseline) and the
CPM package is not imported.

Pieces (separate methods, reused by tools and tests):
    preprocess_image(batched_inputs) -> ImageList (normalised, padded to size_divisibility)
    preprocess_audio(batched_inputs, key="audio") -> (B, Ca, T, F) magnitudes; log_spectrogram(mag)
    encode_visual(images (B, 3, H, W)) -> (mask_features u~_v, multi_scale_features [3])
    encode_audio(log-magnitude (B, Ca, T, F)) -> dict(tokens, tokens_pos, dense u~_a, feature_map u_a)
    audio_features(magnitudes (B, Ca, T, F), stereo_frame=None) -> encode_audio of the log (+ stereo cues)
    stereo_frame(batched_inputs, images) -> (B, 2) where each image's audio frame lies on the canvas
    decode(visual, audio, queries=None, query_pos=None, query_padding_mask=None, audio_masks=False)
    decode_groups(visual, audios, groups) -> one outputs dict per query group (one decoder pass)
    target_labels(batched_inputs) -> per image its targets' classes on the host (checked)
    prepare_targets(batched_inputs, images) -> [{"labels", "masks", "sem_seg"}] (padded)
    class_agnostic_losses(outputs, targets) -> (weighted losses, final-layer indices, num_masks)
    observe_assignments(outputs, targets, indices) -> class predictor observe/step, last_assignments
    semantic_inference(mask_cls (Q, C+1), mask_pred (Q, H, W)) -> (C, H, W)
"""
import logging
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import record_function

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage

from ..backbone import build_audio_backbone
from ..class_predictor.gmm import bank_copies
from ..class_predictor.mixture import PROMPT_SOURCE
from ..criterion import SetCriterion, build_set_criterion, loss_weight_dict
from ..pixel_decoder import AudioPixelDecoder, build_pixel_decoder
from ..transformer_decoder import build_transformer_decoder
from ..transformer_decoder.stereo_position import check_stereo_config, frame_on_canvas, stereo_cues

__all__ = ["CPM"]

logger = logging.getLogger(__name__)

SEMANTIC_INFERENCE = ("argmax_query", "soft_sum")


def _where(x: dict) -> str:
    return x.get("file_name", "<no file_name>")


@META_ARCH_REGISTRY.register()
class CPM(nn.Module):
    """Audio-visual Mask2Former with CPM training; see the module docstring.

    Training input: list of mapper dicts (image, audio magnitude, instances, sem_seg [, noise_audio]).
    Returns weighted scalar losses "loss_ce", "loss_mask", "loss_dice" and "<name>_<i>" for the
    auxiliary predictions, plus the CPM losses ("loss_acp", "loss_vcp_*", "loss_pcl") when
    ``cpm_loss`` and ``prompt_pass`` are set (MODEL.CPM.ENABLED). Inference returns
    [{"sem_seg": (C, height, width), "audio_class_probs": (C,)}].
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        pixel_decoder: nn.Module,
        audio_backbone: nn.Module,
        audio_pixel_decoder: nn.Module,
        transformer_decoder: nn.Module,
        criterion: SetCriterion,
        weight_dict: Dict[str, float],
        num_classes: int,
        num_queries: int,
        size_divisibility: int,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        ignore_value: int = 255,
        audio_channels: int = 1,
        audio_log_offset: float = 1e-6,
        deep_supervision: bool = True,
        semantic_inference: str = "argmax_query",
        observe_all_layers: bool = False,
        observe_correct_only: bool = False,
        observe_prompts: bool = False,
        cpm_loss: Optional[nn.Module] = None,
        prompt_pass: Optional[nn.Module] = None,
        stereo_position: bool = False,
        stereo_backbone_input: str = "mid",
    ):
        super().__init__()
        if semantic_inference not in SEMANTIC_INFERENCE:
            raise ValueError(f"MODEL.MASK_FORMER.TEST.SEMANTIC_INFERENCE must be one of {SEMANTIC_INFERENCE}, "
                             f"got {semantic_inference!r}")
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.audio_backbone = audio_backbone
        self.audio_pixel_decoder = audio_pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.criterion = criterion
        self.weight_dict = dict(weight_dict)
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.size_divisibility = size_divisibility
        self.ignore_value = ignore_value
        self.audio_channels = audio_channels
        self.audio_log_offset = audio_log_offset
        self.deep_supervision = deep_supervision
        self.semantic_inference_rule = semantic_inference
        self.observe_all_layers = bool(observe_all_layers)
        self.observe_correct_only = bool(observe_correct_only)
        self.observe_prompts = bool(observe_prompts)
        # CPM's prompt pass and prompting losses (training only), None = the class-agnostic baseline.
        self.cpm_loss = cpm_loss
        self.prompt_pass = prompt_pass
        # MODEL.AUDIO.STEREO_POSITION: stereo cues for the decoder; "mid": the backbone sees the channel mean
        self.stereo_position = bool(stereo_position)
        self.stereo_backbone_input = stereo_backbone_input
        if self.stereo_position and audio_channels != 2:
            raise ValueError(f"MODEL.AUDIO.STEREO_POSITION.ENABLED needs stereo audio, but "
                             f"MODEL.AUDIO.IN_CHANNELS = {audio_channels}; set it and INPUT.AUDIO.CHANNELS to 2")
        if self.stereo_position and getattr(self.transformer_decoder, "stereo_position", None) is None:
            raise ValueError("MODEL.AUDIO.STEREO_POSITION.ENABLED but the transformer decoder "
                             f"{type(self.transformer_decoder).__name__} has no stereo_position module")
        if cpm_loss is not None and not getattr(self.class_predictor, "can_sample", False):
            raise ValueError(
                "MODEL.CPM.ENABLED needs a class predictor that samples prompts "
                f"(GMMClassPredictor or LinearClassPredictor); {type(self.class_predictor).__name__} does not"
            )
        if (cpm_loss is None) != (prompt_pass is None):
            raise ValueError("CPM's prompting needs both its losses (cpm_loss) and its prompt pass (prompt_pass), "
                             "as from_config builds them with MODEL.CPM.ENABLED; got only one")
        if cpm_loss is not None:
            switches = lambda p, l: (p.acp, p.vcp, p.pcl, p.vcp_audio) != (  # noqa: E731
                l.acp_enabled, l.vcp_enabled, l.pcl_enabled, l.vcp_audio)
            if switches(prompt_pass, cpm_loss):
                raise ValueError(f"the prompt pass ({prompt_pass.extra_repr()}) and the CPM losses ({cpm_loss.extra_repr()}) "
                                 "were built from different MODEL.CPM.ACP/VCP/PCL settings")
        if self.observe_prompts and prompt_pass is None:
            raise ValueError("MODEL.MASK_FORMER.GMM.OBSERVE_PROMPTS banks the embeddings of CPM's prompts and needs "
                             "MODEL.CPM.ENABLED True; set it to False for training without CPM")
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(f"MODEL.PIXEL_MEAN / PIXEL_STD must have 3 (RGB) entries, got {list(pixel_mean)} / "
                             f"{list(pixel_std)}")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # Training iteration counter (checkpointed): passed to class_predictor.observe()/step().
        self.register_buffer("_iter", torch.zeros((), dtype=torch.long))
        # Class id assigned to each class-agnostic query by the last matching (CPU, (B, N)).
        self.last_assignments: Optional[torch.Tensor] = None

    @classmethod
    def from_config(cls, cfg):
        if cfg.INPUT.FORMAT != "RGB":
            raise ValueError(f"INPUT.FORMAT must be 'RGB' (images are RGB; PIXEL_MEAN is in RGB order), "
                             f"got {cfg.INPUT.FORMAT!r}")
        mf = cfg.MODEL.MASK_FORMER
        _check_bank_config(cfg)
        # built in this order (a seed gives the same weights as before the CPM loss existed)
        backbone = build_backbone(cfg)
        pixel_decoder = build_pixel_decoder(cfg, backbone.output_shape())
        audio_backbone = build_audio_backbone(cfg)
        audio_pixel_decoder = AudioPixelDecoder(cfg, audio_backbone.output_shape())
        transformer_decoder = build_transformer_decoder(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM)
        size_div = mf.SIZE_DIVISIBILITY if mf.SIZE_DIVISIBILITY > 0 else backbone.size_divisibility
        cpm_loss = prompt_pass = None
        if cfg.MODEL.CPM.ENABLED:
            from ..cpm import CPMLoss, PromptPass  # CPM's training code is imported only when it is used

            cpm_loss, prompt_pass = CPMLoss(cfg), PromptPass(cfg)
        return {
            "backbone": backbone,
            "pixel_decoder": pixel_decoder,
            "audio_backbone": audio_backbone,
            "audio_pixel_decoder": audio_pixel_decoder,
            "transformer_decoder": transformer_decoder,
            "criterion": build_set_criterion(cfg),
            "weight_dict": loss_weight_dict(cfg),
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "size_divisibility": size_div,
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "audio_channels": cfg.MODEL.AUDIO.IN_CHANNELS,
            "audio_log_offset": cfg.MODEL.AUDIO.LOG_OFFSET,
            "deep_supervision": mf.DEEP_SUPERVISION,
            "semantic_inference": mf.TEST.SEMANTIC_INFERENCE,
            "observe_all_layers": cfg.MODEL.MASK_FORMER.GMM.OBSERVE_LAYERS == "all",
            "observe_correct_only": cfg.MODEL.MASK_FORMER.GMM.OBSERVE_CORRECT_ONLY,
            "observe_prompts": cfg.MODEL.MASK_FORMER.GMM.OBSERVE_PROMPTS,
            "cpm_loss": cpm_loss,
            "prompt_pass": prompt_pass,
            "stereo_position": check_stereo_config(cfg),
            "stereo_backbone_input": cfg.MODEL.AUDIO.STEREO_POSITION.BACKBONE_INPUT,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def class_predictor(self):
        """The class head shared by every decoder layer (a ClassPredictor)."""
        return self.transformer_decoder.class_predictor

    # ------------------------------------------------------------------------------ inputs
    def preprocess_image(self, batched_inputs: List[dict]) -> ImageList:
        """Normalise (RGB mean/std) and pad to ``size_divisibility`` (pad value 0 after normalising)."""
        images = []
        for x in batched_inputs:
            img = x.get("image")
            if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3:
                shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
                raise ValueError(f"input {_where(x)}: 'image' must be a 3 x H x W RGB tensor, got {shape}")
            images.append((img.to(self.device).float() - self.pixel_mean) / self.pixel_std)
        return ImageList.from_tensors(images, self.size_divisibility)

    def preprocess_audio(self, batched_inputs: List[dict], key: str = "audio") -> torch.Tensor:
        """Stack the magnitude spectrograms ``x[key]`` (Ca, T, F) into (B, Ca, T, F) float32 on the
        device; checked non-negative (linear magnitudes) before they leave the host."""
        audios = []
        for x in batched_inputs:
            a = x.get(key)
            if not isinstance(a, torch.Tensor) or a.dim() != 3 or a.shape[0] != self.audio_channels:
                shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                raise ValueError(f"input {_where(x)}: {key!r} must be a ({self.audio_channels}, T, F) tensor "
                                 f"(MODEL.AUDIO.IN_CHANNELS = {self.audio_channels}), got {shape}")
            if audios and a.shape != audios[0].shape:
                raise ValueError(f"input {_where(x)}: {key!r} shape {tuple(a.shape)} differs from the first "
                                 f"item's {tuple(audios[0].shape)}; a batch needs one audio window length")
            audios.append(a)
        stacked = torch.stack(audios)
        if bool((stacked < 0).any()):  # on the host (the mapper's tensors): no device sync
            bad = next(x for x, a in zip(batched_inputs, audios) if bool((a < 0).any()))
            raise ValueError(f"input {_where(bad)}: {key!r} has negative values; the model takes linear magnitudes "
                             "(it applies the log itself, MODEL.AUDIO.LOG_OFFSET), not log-magnitudes")
        return stacked.to(device=self.device, dtype=torch.float32)

    def target_labels(self, batched_inputs: List[dict]) -> List[torch.Tensor]:
        """Per image the classes of its "instances" (T_b,) int64 on the host, checked to lie in
        [0, MODEL.SEM_SEG_HEAD.NUM_CLASSES) once for the batch."""
        labels = []
        for x in batched_inputs:
            inst = x.get("instances")
            if inst is None:
                raise ValueError(f"training input {_where(x)} has no 'instances' (the mapper must add them)")
            labels.append(inst.gt_classes.cpu().long())
        flat = torch.cat(labels)
        if flat.numel() and not (0 <= int(flat.min()) and int(flat.max()) < self.num_classes):
            bad = next(x for x, lab in zip(batched_inputs, labels)
                       if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes))
            raise ValueError(f"input {_where(bad)}: gt_classes outside [0, {self.num_classes - 1}] "
                             f"(MODEL.SEM_SEG_HEAD.NUM_CLASSES = {self.num_classes})")
        return labels

    def prepare_targets(self, batched_inputs: List[dict], images: ImageList,
                        labels: Optional[List[torch.Tensor]] = None) -> List[Dict[str, torch.Tensor]]:
        """Per image: "labels" (K,) int64, "masks" (K, Hp, Wp) bool zero-padded to the padded image
        size, and "sem_seg" (Hp, Wp) int64 padded with the ignore value when the input has one
        (classes in [0, C) or the ignore value, checked on the host). ``labels``: ``target_labels``
        of the inputs when already computed."""
        hp, wp = images.tensor.shape[-2:]
        labels = self.target_labels(batched_inputs) if labels is None else labels
        targets, sems = [], {}
        for i, (x, lab) in enumerate(zip(batched_inputs, labels)):
            masks = x["instances"].gt_masks
            masks = getattr(masks, "tensor", masks)
            if masks.dim() != 3 or masks.shape[0] != lab.shape[0]:
                raise ValueError(f"input {_where(x)}: gt_masks {tuple(masks.shape)} do not match gt_classes "
                                 f"{tuple(lab.shape)}")
            h, w = masks.shape[-2:]
            padded = torch.zeros((masks.shape[0], hp, wp), dtype=torch.bool, device=self.device)
            padded[:, :h, :w] = masks.to(self.device, torch.bool)
            targets.append({"labels": lab.to(self.device), "masks": padded})
            if "sem_seg" in x:
                sem = x["sem_seg"].long()
                sems[i] = F.pad(sem, (0, wp - sem.shape[-1], 0, hp - sem.shape[-2]), value=self.ignore_value)
        if sems:
            sem = torch.stack(list(sems.values()))
            bad = (sem != self.ignore_value) & ((sem < 0) | (sem >= self.num_classes))
            if bool(bad.any()):  # on the host (the mapper's tensors): no device sync
                x = batched_inputs[list(sems)[int(bad.flatten(1).any(1).int().argmax())]]
                raise ValueError(f"input {_where(x)}: 'sem_seg' holds values outside [0, {self.num_classes - 1}] "
                                 f"other than the ignore value {self.ignore_value} "
                                 "(MODEL.SEM_SEG_HEAD.NUM_CLASSES / IGNORE_VALUE)")
            for i, s_ in zip(sems, sem.to(self.device).unbind(0)):
                targets[i]["sem_seg"] = s_
        return targets

    def log_spectrogram(self, magnitude: torch.Tensor) -> torch.Tensor:
        """The audio backbone's input: log(magnitude + MODEL.AUDIO.LOG_OFFSET), same shape."""
        return torch.log(magnitude + self.audio_log_offset)

    def stereo_frame(self, batched_inputs: List[dict], images: ImageList) -> torch.Tensor:
        """(B, 2): (left edge, width) of each image's audio frame as fractions of the padded canvas,
        from the mapper's "audio_frame_span" ((0, 1) when absent: the image is the whole frame)."""
        spans = []
        for x in batched_inputs:
            span = x.get("audio_frame_span")
            span = torch.as_tensor([0.0, 1.0] if span is None else span, dtype=torch.float32)
            if span.shape != (2,) or not torch.isfinite(span).all() or not span[1] > span[0]:
                raise ValueError(f"input {_where(x)}: 'audio_frame_span' must be 2 increasing finite "
                                 f"fractions, got {span.tolist()}")
            spans.append(span)
        return frame_on_canvas(torch.stack(spans).to(self.device), images.image_sizes, images.tensor.shape[-1])

    def audio_features(self, magnitudes: torch.Tensor, stereo_frame: Optional[torch.Tensor] = None
                       ) -> Dict[str, torch.Tensor]:
        """Linear magnitudes (B, Ca, T, F) -> encode_audio(log) and, with the stereo position, the
        cues "stereo_x", "stereo_log_energy" (B, T', F') on the dense map's grid and "stereo_frame"
        (B, 2) (``stereo_frame``; None: every image is the whole, unpadded frame)."""
        if not self.stereo_position:
            return self.encode_audio(self.log_spectrogram(magnitudes))
        backbone_input = magnitudes
        if self.stereo_backbone_input == "mid":  # semantics from the channel mean only
            backbone_input = magnitudes.mean(1, keepdim=True).expand_as(magnitudes)
        audio = self.encode_audio(self.log_spectrogram(backbone_input))
        audio.update(stereo_cues(magnitudes, audio["dense"].shape[-2:]))
        if stereo_frame is not None:
            audio["stereo_frame"] = stereo_frame
        return audio

    # ------------------------------------------------------------------------------ encoders / decoder
    # record_function labels name the pieces for torch.profiler (tools/benchmark.py reads them)
    @record_function("cpm.encode_visual")
    def encode_visual(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """images (B, 3, Hp, Wp) normalised -> (u~_v (B, MASK_DIM, Hp/4, Wp/4), 3 maps coarsest first)."""
        return self.pixel_decoder(self.backbone(images))

    @record_function("cpm.encode_audio")
    def encode_audio(self, log_spectrogram: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, Ca, T, F) log-magnitude -> dict(tokens (B, L, D), tokens_pos (B, L, D),
        dense u~_a (B, D_a, T', F'), feature_map u_a (B, D_a, T', F')), T' = ceil(T/4), F' = ceil(F/4)."""
        return self.audio_pixel_decoder(self.audio_backbone(log_spectrogram))

    @record_function("cpm.decode")
    def decode(self, visual: Tuple[torch.Tensor, List[torch.Tensor]], audio: Dict[str, torch.Tensor],
               queries: Optional[torch.Tensor] = None, query_pos: Optional[torch.Tensor] = None,
               query_padding_mask: Optional[torch.Tensor] = None, audio_masks: bool = False) -> Dict:
        """Run the query decoder. ``queries=None``: the N learnable class-agnostic queries; otherwise
        custom (B, Q, D) queries (with optional (B, Q, D) ``query_pos`` and (B, Q) bool
        ``query_padding_mask``, True = padding). Returns pred_logits (B, Q, C+1), pred_masks
        (B, Q, Hp/4, Wp/4), query_embeddings (B, Q, D), audio_pred_logits (B, Q, C+1), aux_outputs
        [per-layer dicts] (+ query_padding_mask; + pred_audio_masks (B, Q, T', F') with ``audio_masks``)."""
        mask_features, multi_scale = visual
        return self.transformer_decoder(multi_scale, mask_features, audio, queries=queries, query_pos=query_pos,
                                        query_padding_mask=query_padding_mask, audio_masks=audio_masks)

    @record_function("cpm.decode")
    def decode_groups(self, visual: Tuple[torch.Tensor, List[torch.Tensor]], audios: List[Dict[str, torch.Tensor]],
                      groups: List) -> List[Dict]:
        """One decoder pass over query groups (transformer_decoder/query_groups.py: ``QueryGroup``),
        each hearing ``audios[group.audio]``, none seeing another -> one outputs dict per group (as
        ``decode``'s, without the intermediate predictions when deep supervision is off)."""
        mask_features, multi_scale = visual
        outs = self.transformer_decoder.forward_groups(multi_scale, mask_features, audios, groups)
        return [self._without_aux(o) for o in outs]

    # ------------------------------------------------------------------------------ class-agnostic training
    def weight_losses(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Multiply by ``weight_dict``; losses without a weight are dropped."""
        return {k: v * self.weight_dict[k] for k, v in losses.items() if k in self.weight_dict}

    @record_function("cpm.class_agnostic_losses")
    def class_agnostic_losses(self, outputs: Dict, targets: List[Dict]):
        """l_agn: weighted CE + mask + dice (+ aux), the matching of every prediction
        ([aux_0, ..., final], each [(query_idx, target_idx)] per image), and the mask normaliser."""
        losses, indices, num_masks = self.criterion(self._without_aux(outputs), targets, return_indices=True)
        return self.weight_losses(losses), indices, num_masks

    def _assigned_labels(self, shape, target_labels: List[torch.Tensor], indices) -> torch.Tensor:
        """(B, N) class matched to each query by ``indices`` (unmatched -> C = no object), on the host
        (``target_labels`` and the matcher's indices live there)."""
        assigned = torch.full(shape, self.num_classes, dtype=torch.long)
        for i, (labels, (src, tgt)) in enumerate(zip(target_labels, indices)):
            assigned[i, src] = labels[tgt]
        return assigned

    @torch.no_grad()
    @record_function("cpm.observe_assignments")
    def observe_assignments(self, outputs: Dict, targets: List[Dict], indices,
                            target_labels: Optional[List[torch.Tensor]] = None, prompts=None) -> torch.Tensor:
        """Give the class predictor the matched embeddings with their labels (unmatched -> C): the
        final prediction's, or with ``observe_all_layers`` every prediction's (``indices`` as from
        class_agnostic_losses: [aux_0, ..., final]), each with the index of its query in the batch
        (copies of one query from several layers share it); with ``observe_correct_only`` only the
        embeddings whose predicted class (argmax of that prediction's logits) is their label. Step
        the predictor, log its mixtures' state, set ``last_assignments`` (B, N, the final
        matching) on CPU and advance ``_iter``. ``target_labels``: the targets' classes on the
        host (``target_labels``; read from ``targets`` when None). ``prompts``: the step's
        :class:`PromptBatch`; with ``observe_prompts`` its prompts' embeddings (VCP's group, at the
        same predictions as the queries') are banked under their classes too. Labels and query
        indices stay on the host: the class predictor reads nothing back from the device."""
        if target_labels is None:
            target_labels = [t["labels"].cpu() for t in targets]
        emb = outputs["query_embeddings"]
        assigned = self._assigned_labels(emb.shape[:2], target_labels, indices[-1])
        preds = [outputs]
        labels = [assigned]
        if self.observe_all_layers:
            for aux, aux_indices in zip(outputs.get("aux_outputs", []), indices[:-1]):
                preds.append(aux)
                labels.append(self._assigned_labels(emb.shape[:2], target_labels, aux_indices))
        sources = torch.arange(assigned.numel())
        if self.observe_correct_only:  # the predictions' classes live on the device
            sources = sources.to(emb.device)
        # each row's prediction in the decoder's order (aux_i = i, the final one last)
        final = max(self.class_predictor.num_predictions, len(preds)) - 1
        order = [final] + list(range(len(preds) - 1))
        rows = [(p, pred["query_embeddings"].flatten(0, 1), lab.flatten(), sources, pred.get("pred_logits"))
                for p, pred, lab in zip(order, preds, labels)]
        if self.observe_prompts and prompts is not None and prompts.labels.numel():
            # the A prompts are sources PROMPT_SOURCE + 0..A-1 (their copies over predictions count once)
            out = prompts.vcp_outputs
            prompt_preds = [out] + (list(out.get("aux_outputs", [])) if self.observe_all_layers else [])
            prompt_sources = (PROMPT_SOURCE + torch.arange(prompts.labels.numel())).to(sources.device)
            at = (prompts.image_index, prompts.slot_index)
            for p, pred in zip(order, prompt_preds):
                logits = pred["pred_logits"][at] if self.observe_correct_only else None
                rows.append((p, pred["query_embeddings"][at], prompts.host_labels, prompt_sources, logits))
        embs, labs, srcs, whose = [], [], [], []
        for p, e, l, src, logits in rows:
            if self.observe_correct_only:
                l = l.to(emb.device)
                keep = logits.reshape(-1, logits.shape[-1]).argmax(-1) == l
                e, l, src = e[keep], l[keep], src[keep]
            embs.append(e)
            labs.append(l)
            srcs.append(src)
            whose.append(torch.full((l.numel(),), p, dtype=torch.long))
        iteration = int(self._iter)
        self.class_predictor.observe(torch.cat(embs).detach(), torch.cat(labs), iteration, torch.cat(srcs),
                                     torch.cat(whose))
        self.class_predictor.step(iteration)
        self._log_mixtures(iteration)
        self._iter += 1
        self.last_assignments = assigned
        return assigned

    def _log_mixtures(self, iteration: int) -> None:
        """Scalars of the class predictor's mixtures over the real classes (not no-object):
        gmm_bank_age (mean entry age), gmm_live_components_mean / _min (components of weight
        >= LIVE_WEIGHT, over the classes fitted so far) and gmm_fitted_classes."""
        mixtures = getattr(self.class_predictor, "mixtures", None)
        if mixtures is None or not _has_event_storage():
            return
        age = mixtures.bank_age(iteration)[: self.num_classes]
        _put_scalar("gmm_bank_age", age[torch.isfinite(age)].mean())
        fitted = mixtures.fitted[: self.num_classes]
        live = mixtures.live_components()[: self.num_classes][fitted].float()
        _put_scalar("gmm_fitted_classes", fitted.sum().float())
        if live.numel():
            _put_scalar("gmm_live_components_mean", live.mean())
            _put_scalar("gmm_live_components_min", live.min())

    def _without_aux(self, outputs: Dict) -> Dict:
        """The decoder outputs without the intermediate predictions when deep supervision is off."""
        return outputs if self.deep_supervision else {k: v for k, v in outputs.items() if k != "aux_outputs"}

    # ------------------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[dict]):
        images = self.preprocess_image(batched_inputs)
        magnitudes = self.preprocess_audio(batched_inputs)
        visual = self.encode_visual(images.tensor)
        frame = self.stereo_frame(batched_inputs, images) if self.stereo_position else None
        if not self.training:
            return self.inference(self.decode(visual, self.audio_features(magnitudes, frame)), batched_inputs, images)

        labels = self.target_labels(batched_inputs)
        targets = self.prepare_targets(batched_inputs, images, labels)
        prompts = None
        if self.prompt_pass is None:
            outputs = self.decode(visual, self.audio_features(magnitudes, frame))
        else:
            # prompts come from the class predictor of the last iteration (paper: "via the GMM model
            # from the last iteration"): the pass runs before this step's observe_assignments
            outputs, prompts = self.prompt_pass(self, batched_inputs, labels, magnitudes, frame, visual)
        losses, indices, num_masks = self.class_agnostic_losses(outputs, targets)
        if prompts is not None:
            losses.update(self.cpm_loss(prompts, targets, num_masks, visual[0]))
        self.observe_assignments(outputs, targets, indices, labels, prompts)
        return losses

    # ------------------------------------------------------------------------------ inference
    def semantic_inference(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
        """(Q, C+1) class logits, (Q, H, W) mask logits -> (C, H, W) class scores (argmax = the label).

        "argmax_query" (CPM §3.1): c_i = argmax_c p_i(c) over C+1 classes; queries with c_i =
        no-object are dropped; score[c] = max over queries with c_i = c of p_i(c_i) sigma(m_i), so the
        per-pixel argmax is the class of the query maximising p_i(c_i) m_i (0 where none is kept).
        "soft_sum" (Mask2Former): score[c] = sum_i p_i(c) sigma(m_i)."""
        prob = F.softmax(mask_cls, dim=-1)
        masks = mask_pred.sigmoid()
        if self.semantic_inference_rule == "soft_sum":
            return torch.einsum("qc,qhw->chw", prob[..., :-1], masks)
        score, cls = prob.max(-1)
        keep = cls < self.num_classes
        q, h, w = masks.shape
        weighted = (score[keep, None, None] * masks[keep]).flatten(1)  # (Q', H*W)
        out = weighted.new_zeros(self.num_classes, h * w)
        out.scatter_reduce_(0, cls[keep, None].expand_as(weighted), weighted, reduce="amax", include_self=True)
        return out.view(self.num_classes, h, w)

    @record_function("cpm.inference")
    def inference(self, outputs: Dict, batched_inputs: List[dict], images: ImageList) -> List[dict]:
        mask_pred = F.interpolate(outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear",
                                  align_corners=False)
        audio_probs = F.softmax(outputs["audio_pred_logits"].float(), dim=-1)[..., :-1].max(1).values
        results = []
        for i, (x, size) in enumerate(zip(batched_inputs, images.image_sizes)):
            height = x.get("height", size[0])
            width = x.get("width", size[1])
            masks = sem_seg_postprocess(mask_pred[i].float(), size, height, width)
            results.append({
                "sem_seg": self.semantic_inference(outputs["pred_logits"][i].float(), masks),
                "audio_class_probs": audio_probs[i],
            })
        return results


def _check_bank_config(cfg) -> None:
    """MODEL.MASK_FORMER.GMM's bank keys, where per-class mixtures are built: a class must be able to
    reach its first fit (MIN_ENTRIES_PER_COMPONENT x NUM_COMPONENTS distinct entries)."""
    g, mf = cfg.MODEL.MASK_FORMER.GMM, cfg.MODEL.MASK_FORMER
    if g.OBSERVE_LAYERS not in ("last", "all"):
        raise ValueError(f"MODEL.MASK_FORMER.GMM.OBSERVE_LAYERS must be 'last' or 'all', got {g.OBSERVE_LAYERS!r}")
    uses_mixtures = mf.CLASS_PREDICTOR == "GMMClassPredictor" or (
        cfg.MODEL.CPM.ENABLED and cfg.MODEL.CPM.LINEAR_HEAD_PROMPTS == "gmm")
    if not uses_mixtures:
        return
    copies = bank_copies(cfg)
    needed = max(2, g.MIN_ENTRIES_PER_COMPONENT * g.NUM_COMPONENTS)
    if needed * copies > g.MEMORY_SIZE:
        raise ValueError(
            f"MODEL.MASK_FORMER.GMM: a class is first fitted once its bank holds {needed} distinct entries "
            f"(MIN_ENTRIES_PER_COMPONENT {g.MIN_ENTRIES_PER_COMPONENT} x NUM_COMPONENTS {g.NUM_COMPONENTS}), but "
            f"MEMORY_SIZE {g.MEMORY_SIZE} holds only {g.MEMORY_SIZE // copies} distinct queries when each is banked "
            f"{copies} times (OBSERVE_LAYERS 'all', {copies} predictions): raise MEMORY_SIZE to >= {needed * copies}, "
            "set OBSERVE_LAYERS 'last', or lower MIN_ENTRIES_PER_COMPONENT")


def _has_event_storage() -> bool:
    """Whether training runs under a detectron2 EventStorage (scalars have somewhere to go)."""
    try:
        get_event_storage()
    except AssertionError:
        return False
    return True


def _put_scalar(name: str, value: torch.Tensor) -> None:
    """Log a scalar to detectron2's event storage when training runs under one."""
    try:
        storage = get_event_storage()
    except AssertionError:  # no EventStorage (e.g. a unit test calling the model directly)
        return
    if torch.isfinite(value):
        storage.put_scalar(name, float(value))
