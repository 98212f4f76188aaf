"""Mask2Former (semantic segmentation) checkpoint -> this repo's ``CPM`` parameter names.

A checkpoint of facebookresearch/Mask2Former's ``MaskFormer`` meta-architecture (``.pkl`` from its
model zoo or a ``model_final.pth`` of a Mask2Former run) has three top-level parts: ``backbone``
(detectron2 ResNet), ``sem_seg_head`` (``pixel_decoder`` = ``MSDeformAttnPixelDecoder`` and
``predictor`` = ``MultiScaleMaskedTransformerDecoder``) and ``criterion`` (one loss buffer).
CPM keeps the same modules under other names and adds the audio side. The map
(``L`` = a layer index, ``*`` = the rest of the key, unchanged):

==========================================================================  ==================================================
Mask2Former                                                                 CPM
==========================================================================  ==================================================
``backbone.*``                                                              ``backbone.*``
``sem_seg_head.pixel_decoder.transformer.level_embed``                      ``pixel_decoder.level_embed``
``sem_seg_head.pixel_decoder.transformer.encoder.layers.L.*``               ``pixel_decoder.encoder.layers.L.*``
``sem_seg_head.pixel_decoder.input_proj.*``                                 ``pixel_decoder.input_proj.*`` (both coarsest first)
``sem_seg_head.pixel_decoder.adapter_J.*`` / ``layer_J.*``                  ``pixel_decoder.lateral_convs.K.*`` / ``output_convs.K.*``
``sem_seg_head.pixel_decoder.mask_features.*``                              ``pixel_decoder.mask_features.*``
``sem_seg_head.predictor.transformer_cross_attention_layers.L.multihead_attn.*``  ``transformer_decoder.cross_attention.L.attn.*``
``sem_seg_head.predictor.transformer_self_attention_layers.L.self_attn.*``  ``transformer_decoder.self_attention.L.attn.*``
``sem_seg_head.predictor.transformer_*_attention_layers.L.norm.*``          ``transformer_decoder.*_attention.L.norm.*``
``sem_seg_head.predictor.transformer_ffn_layers.L.*``                       ``transformer_decoder.ffn.L.*``
``sem_seg_head.predictor.{decoder_norm,query_feat,query_embed,level_embed,input_proj,mask_embed}.*``  ``transformer_decoder.<same>.*``
``sem_seg_head.predictor.class_embed.*``                                    ``transformer_decoder.class_predictor.linear.*``
``criterion.empty_weight``                                                  dropped (CPM's criterion recomputes it from the config)
==========================================================================  ==================================================

FPN levels: Mask2Former names its extra FPN convs ``adapter_J`` / ``layer_J`` with J = 1 for the
finest level (res2), while CPM lists them coarsest first, so with F levels ``J -> K = F - J``
(the default COMMON_STRIDE 4 has a single level: ``adapter_1 -> lateral_convs.0``).

Decoder layers: Mask2Former's ``MODEL.MASK_FORMER.DEC_LAYERS = D`` counts the prediction made from
the raw queries, so it *builds* D - 1 masked-attention layers (``transformer_*_layers.0 .. D-2``;
the public semantic-segmentation configs use D = 10, i.e. 9 layers). CPM builds
``MODEL.MASK_FORMER.AUDIO_DEC_LAYERS`` audio layers (cross-attention to the audio tokens), then
``DEC_LAYERS`` masked-attention visual layers. Mask2Former layer L initialises CPM visual layer L:
both stacks attend scale ``L % 3``, coarsest first, and keep Mask2Former's
cross-attention -> self-attention -> FFN order. So with Mask2Former D = 10 and CPM DEC_LAYERS = 9
(``configs/Base-AVS.yaml``) every visual layer is initialised; the audio layers, the audio
backbone / pixel decoder and ``audio_mask_embed`` are new. Extra Mask2Former layers (CPM
DEC_LAYERS < D - 1) are dropped; extra CPM layers keep their initialisation. The loader's table
reports each case.

Class head: Mask2Former's ``class_embed`` is a ``Linear(hidden, K + 1)`` whose last output is
"no object", the same convention as CPM's ``LinearClassPredictor`` (C + 1 outputs). It loads only
when K equals ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` (C); otherwise (e.g. ADE20K's 150 classes vs
AVSS's 71) the head is reported as a shape mismatch and stays newly initialised. The GMM head
(CCDM) has no linear layer, so ``class_embed`` is dropped there.

The key names were taken from Mask2Former's ``maskformer_model.py``,
``modeling/meta_arch/mask_former_head.py``, ``modeling/pixel_decoder/msdeformattn.py``,
``modeling/pixel_decoder/ops/modules/ms_deform_attn.py`` and
``modeling/transformer_decoder/mask2former_transformer_decoder.py``.
"""
import re
from typing import Dict, Iterable, List, Tuple

__all__ = ["is_mask2former_state_dict", "remap_mask2former_state_dict", "MASK2FORMER_PREFIXES"]

MASK2FORMER_PREFIXES = ("sem_seg_head.pixel_decoder.", "sem_seg_head.predictor.")

_PD = "sem_seg_head.pixel_decoder."
_TD = "sem_seg_head.predictor."

# (pattern, replacement) applied to the full key; the first match wins.
_RULES: List[Tuple[re.Pattern, str]] = [
    (re.compile(r"^backbone\.(.*)$"), r"backbone.\1"),
    # pixel decoder
    (re.compile(r"^" + re.escape(_PD) + r"transformer\.level_embed$"), r"pixel_decoder.level_embed"),
    (re.compile(r"^" + re.escape(_PD) + r"transformer\.encoder\.layers\.(\d+)\.(.*)$"),
     r"pixel_decoder.encoder.layers.\1.\2"),
    (re.compile(r"^" + re.escape(_PD) + r"input_proj\.(.*)$"), r"pixel_decoder.input_proj.\1"),
    (re.compile(r"^" + re.escape(_PD) + r"mask_features\.(.*)$"), r"pixel_decoder.mask_features.\1"),
    # transformer decoder
    (re.compile(r"^" + re.escape(_TD) + r"transformer_cross_attention_layers\.(\d+)\.multihead_attn\.(.*)$"),
     r"transformer_decoder.cross_attention.\1.attn.\2"),
    (re.compile(r"^" + re.escape(_TD) + r"transformer_cross_attention_layers\.(\d+)\.norm\.(.*)$"),
     r"transformer_decoder.cross_attention.\1.norm.\2"),
    (re.compile(r"^" + re.escape(_TD) + r"transformer_self_attention_layers\.(\d+)\.self_attn\.(.*)$"),
     r"transformer_decoder.self_attention.\1.attn.\2"),
    (re.compile(r"^" + re.escape(_TD) + r"transformer_self_attention_layers\.(\d+)\.norm\.(.*)$"),
     r"transformer_decoder.self_attention.\1.norm.\2"),
    (re.compile(r"^" + re.escape(_TD) + r"transformer_ffn_layers\.(\d+)\.(linear1|linear2|norm)\.(.*)$"),
     r"transformer_decoder.ffn.\1.\2.\3"),
    (re.compile(r"^" + re.escape(_TD) + r"(decoder_norm|query_feat|query_embed|level_embed|input_proj|mask_embed)\.(.*)$"),
     r"transformer_decoder.\1.\2"),
    # MaskFormer checkpoints before Mask2Former's weight-format version 2 called the queries static_query.
    (re.compile(r"^" + re.escape(_TD) + r"static_query\.(.*)$"), r"transformer_decoder.query_feat.\1"),
    (re.compile(r"^" + re.escape(_TD) + r"class_embed\.(weight|bias)$"), r"transformer_decoder.class_predictor.linear.\1"),
]

_FPN = re.compile(r"^" + re.escape(_PD) + r"(adapter|layer)_(\d+)\.(.*)$")

# Checkpoint keys that have no counterpart by design, with the reason shown in the load table.
_DROPPED = {
    "criterion.empty_weight": "loss weight of no-object; CPM's criterion computes it from the config",
}


def _all_prefixed(keys: Iterable[str], prefix: str = "module.") -> bool:
    keys = list(keys)
    return bool(keys) and all(k.startswith(prefix) for k in keys)


def is_mask2former_state_dict(state_dict) -> bool:
    """True when ``state_dict`` has Mask2Former's ``sem_seg_head.{pixel_decoder,predictor}`` layout."""
    return any(k.startswith(p) or k.startswith("module." + p) for k in state_dict for p in MASK2FORMER_PREFIXES)


def remap_mask2former_state_dict(state_dict: Dict) -> Tuple[Dict, Dict[str, str], Dict[str, str]]:
    """Rename a Mask2Former state dict to CPM's names (see the module docstring).

    Returns ``(new_state_dict, renamed, dropped)``: ``renamed`` maps each new key to the
    Mask2Former key it came from; ``dropped`` maps each Mask2Former key removed on purpose to the
    reason. Keys no rule knows (e.g. another pixel decoder's) are kept under their own name, so
    the loader reports them as checkpoint tensors the model does not have.
    """
    if _all_prefixed(state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    fpn_levels = sorted({int(m.group(2)) for m in map(_FPN.match, state_dict) if m})
    num_fpn = len(fpn_levels)
    new, renamed, dropped = {}, {}, {}
    for key, value in state_dict.items():
        if key in _DROPPED:
            dropped[key] = _DROPPED[key]
            continue
        target = None
        m = _FPN.match(key)
        if m:
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            module = "lateral_convs" if kind == "adapter" else "output_convs"
            target = f"pixel_decoder.{module}.{num_fpn - j}.{rest}"
        else:
            for pattern, repl in _RULES:
                if pattern.match(key):
                    target = pattern.sub(repl, key)
                    break
        if target is None:
            target = key  # unknown: reported as unexpected by the loader
        elif target != key:
            renamed[target] = key
        if target in new:
            raise ValueError(f"Mask2Former remap: two checkpoint keys map to {target!r} ({renamed.get(target)!r}, {key!r})")
        new[target] = value
    return new, renamed, dropped
