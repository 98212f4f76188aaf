"""The audio-visual query decoder: an audio decoder, then Mask2Former's masked-attention decoder.

Query path (every tensor batch-first):
    q (B, Q, D)  --[AUDIO_DEC_LAYERS x (cross-attn to audio tokens, self-attn, FFN)]-->
                 --[DEC_LAYERS x (masked cross-attn to visual scale i % 3, self-attn, FFN)]--> q̃
After every layer the shared heads predict, from q̃ = LayerNorm(q):
    class logits  = class_predictor(q̃)                  (B, Q, C+1)  one call for all predictions, after the pass
    mask logits   = <mask_embed(q̃), ũ_v>                 (B, Q, H/4, W/4)
    audio masks   = <audio_mask_embed(q̃), ũ_a>           (B, Q, T', F')  only when asked (CPM's prompts)
The prediction after the last audio layer (or of the raw queries when AUDIO_DEC_LAYERS = 0)
gives the attention mask of the first visual layer and the "audio_pred_logits" (coverage score).

With MODEL.AUDIO.STEREO_POSITION.ENABLED (stereo_position.py) every audio-decoder prediction (the
raw queries' one when AUDIO_DEC_LAYERS = 0) also estimates where the query's sound is, from the
inter-channel level difference of the bins its audio mask selects, x̂ (B, Q) ("pred_stereo_x"),
and adds a prior over image columns to its mask logits:
    mask logits   = <mask_embed(q̃), ũ_v> - g(q̃) ((u - x̂) / σ)^2      (B, Q, H/4, W/4)
The visual decoder does not hear the audio again, so the last audio prediction's prior is added
to every visual prediction's mask logits as it is; every attention mask, derived from those
logits, carries it too. Switched off, nothing of it is built or computed (the paper's model,
parameter for parameter).

Query groups (query_groups.py, ``forward_groups``): several query sets decoded in one pass, each
hearing its own audio and seeing only its own group in self-attention (CPM's prompts beside the
class-agnostic queries in training); ``forward`` is the one-group case.

Layer count, as in Mask2Former: MODEL.MASK_FORMER.DEC_LAYERS counts the predictions of the
visual decoder including the one made before its first layer, so DEC_LAYERS - 1 masked-attention
layers are built (Mask2Former's 10 -> 9). Here that first prediction is the audio decoder's last.
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d
import fvcore.nn.weight_init as weight_init

from ..class_predictor import build_class_predictor
from ..decoder_predictions import count_predictions
from .position_encoding import PositionEmbeddingSine
from .query_groups import QueryGroup, audio_memory, cat, per_group, runs, self_attention_mask
from .registry import TRANSFORMER_DECODER_REGISTRY
from .stereo_position import StereoPositionPrior, check_stereo_config

__all__ = ["AudioVisualTransformerDecoder", "QueryGroup", "SelfAttentionLayer", "CrossAttentionLayer", "FFNLayer",
           "MLP"]


def _with_pos(x, pos):
    return x if pos is None else x + pos


class _Residual(nn.Module):
    """A decoder sub-layer's residual connection with dropout, and its LayerNorm on the input
    (``normalize_before``, pre-norm) or on the sum (post-norm)."""

    def __init__(self, d_model, dropout=0.0, normalize_before=False):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _input(self, tgt):
        return self.norm(tgt) if self.normalize_before else tgt

    def _residual(self, tgt, out):
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class _ResidualAttention(_Residual):
    """Multi-head attention (batch first) inside a :class:`_Residual`."""

    def __init__(self, d_model, nhead, dropout=0.0, normalize_before=False):
        super().__init__(d_model, dropout, normalize_before)
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)


class SelfAttentionLayer(_ResidualAttention):
    """(B, Q, D) -> (B, Q, D); ``key_padding_mask`` (B, Q) True = padded query (ignored as a key);
    ``attn_mask`` (Q, Q) True = blocked (query groups that must not see each other)."""

    def forward(self, tgt, key_padding_mask=None, query_pos=None, attn_mask=None):
        x = self._input(tgt)
        q = k = _with_pos(x, query_pos)
        out = self.attn(q, k, value=x, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=False)[0]
        return self._residual(tgt, out)


class CrossAttentionLayer(_ResidualAttention):
    """Queries (B, Q, D) attend ``memory`` (B, S, D); ``memory_mask`` (B*nheads, Q, S) or (Q, S) True = blocked."""

    def forward(self, tgt, memory, memory_mask=None, pos=None, query_pos=None):
        x = self._input(tgt)
        out = self.attn(_with_pos(x, query_pos), _with_pos(memory, pos), value=memory, attn_mask=memory_mask,
                        need_weights=False)[0]
        return self._residual(tgt, out)


class FFNLayer(_Residual):
    """Residual two-layer MLP with ReLU. (B, Q, D) -> (B, Q, D)."""

    def __init__(self, d_model, dim_feedforward=2048, dropout=0.0, normalize_before=False):
        super().__init__(d_model, dropout, normalize_before)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)

    def forward(self, tgt):
        out = self.linear2(self.dropout(F.relu(self.linear1(self._input(tgt)))))
        return self._residual(tgt, out)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


@TRANSFORMER_DECODER_REGISTRY.register()
class AudioVisualTransformerDecoder(nn.Module):
    """See the module docstring. ``forward`` returns the outputs dict of the CPM contract."""

    @configurable
    def __init__(self, in_channels: int, *, class_predictor: nn.Module, hidden_dim: int, num_queries: int,
                 nheads: int, dim_feedforward: int, dec_layers: int, audio_dec_layers: int, pre_norm: bool,
                 mask_dim: int, audio_mask_dim: int, enforce_input_project: bool, dropout: float = 0.0,
                 stereo_position: bool = False, stereo_width: float = 0.1, stereo_init_gain: float = 0.5):
        super().__init__()
        if dec_layers < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 2 (one "
                             f"masked-attention layer), got {dec_layers + 1}")
        if hidden_dim % nheads != 0:
            raise ValueError(f"MODEL.MASK_FORMER.HIDDEN_DIM {hidden_dim} is not divisible by MODEL.MASK_FORMER.NHEADS {nheads}")
        self.class_predictor = class_predictor
        predictions = count_predictions(dec_layers, audio_dec_layers)
        if class_predictor.num_predictions not in (1, predictions):
            raise ValueError(f"the class predictor keeps {class_predictor.num_predictions} per-prediction states but this "
                             f"decoder makes {predictions} predictions (MODEL.MASK_FORMER.DEC_LAYERS, AUDIO_DEC_LAYERS)")
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.num_audio_layers = audio_dec_layers
        self.num_queries = num_queries
        self.hidden_dim = hidden_dim
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)

        def block(n):
            return (nn.ModuleList(CrossAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(n)),
                    nn.ModuleList(SelfAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(n)),
                    nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward, dropout, pre_norm) for _ in range(n)))

        self.audio_cross_attention, self.audio_self_attention, self.audio_ffn = block(audio_dec_layers)
        self.cross_attention, self.self_attention, self.ffn = block(dec_layers)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.num_feature_levels = 3
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = Conv2d(in_channels, hidden_dim, 1)
                weight_init.c2_xavier_fill(proj)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Identity())
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.audio_mask_embed = MLP(hidden_dim, hidden_dim, audio_mask_dim, 3)
        for layers in (self.audio_cross_attention, self.audio_self_attention, self.cross_attention,
                       self.self_attention):
            for p in layers.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        # Last, and drawing no random numbers: every other weight of a seeded model is the same with
        # the switch on or off. None when off (no parameters, no state-dict keys, no computation).
        self.stereo_position = (StereoPositionPrior(hidden_dim, stereo_width, stereo_init_gain)
                                if stereo_position else None)

    @classmethod
    def from_config(cls, cfg, in_channels):
        mf = cfg.MODEL.MASK_FORMER
        return {
            "in_channels": in_channels,
            "class_predictor": build_class_predictor(cfg, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, mf.HIDDEN_DIM),
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            "dec_layers": mf.DEC_LAYERS - 1,  # Mask2Former's meaning (see the module docstring)
            "audio_dec_layers": mf.AUDIO_DEC_LAYERS,
            "pre_norm": mf.PRE_NORM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "audio_mask_dim": cfg.MODEL.AUDIO.PIXEL_DECODER_DIM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            "dropout": mf.DROPOUT,
            "stereo_position": check_stereo_config(cfg),
            "stereo_width": cfg.MODEL.AUDIO.STEREO_POSITION.WIDTH,
            "stereo_init_gain": cfg.MODEL.AUDIO.STEREO_POSITION.INIT_GAIN,
        }

    # ------------------------------------------------------------------------------------------
    def _initial_queries(self, batch_size, queries, query_pos, query_padding_mask):
        if queries is None:
            if query_pos is not None or query_padding_mask is not None:
                raise ValueError("query_pos / query_padding_mask need custom queries")
            q = self.query_feat.weight.unsqueeze(0).expand(batch_size, -1, -1)
            pos = self.query_embed.weight.unsqueeze(0).expand(batch_size, -1, -1)
            return q, pos, None
        if queries.dim() != 3 or queries.shape[0] != batch_size or queries.shape[2] != self.hidden_dim:
            raise ValueError(f"queries must be (B={batch_size}, Q, {self.hidden_dim}), "
                             f"got {tuple(queries.shape)}")
        if query_pos is None:
            query_pos = torch.zeros_like(queries)
        elif query_pos.shape != queries.shape:
            raise ValueError(f"query_pos {tuple(query_pos.shape)} != queries "
                             f"{tuple(queries.shape)}")
        if query_padding_mask is not None:
            if query_padding_mask.shape != queries.shape[:2]:
                raise ValueError(f"query_padding_mask must be {tuple(queries.shape[:2])}, "
                                 f"got {tuple(query_padding_mask.shape)}")
            query_padding_mask = query_padding_mask.to(torch.bool)
            # an image whose every query is padding would make softmax NaN: let it attend freely
            query_padding_mask = query_padding_mask & ~query_padding_mask.all(1, keepdim=True)
        return queries, query_pos, query_padding_mask

    def _predict(self, output, mask_features, audios, layout, attn_size, stereo=None, prior=None, final=False):
        """One prediction of every group, without class logits (``_classify`` adds them) -> (per-group
        pred dicts, attention mask for the next layer or None after the final prediction, stereo
        prior or None). ``layout``: (groups, sizes, offsets); ``stereo``: the stereo prior's
        per-forward constants per audio; ``prior``: (bias, x̂) over all queries to reuse (visual
        layers) instead of estimating it from this prediction's audio masks (audio layers);
        ``final``: the last prediction (mask logits only for the groups that keep them)."""
        groups, sizes, offsets = layout
        total = offsets[-1] + sizes[-1]
        sources = [g.audio for g in groups]
        emb = self.decoder_norm(output)

        def rows(start, end):
            return emb if (start, end) == (0, total) else emb[:, start:end]

        mask_end = total
        if final:
            mask_end = max([o + n for o, n, g in zip(offsets, sizes, groups) if g.masks] or [0])
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(rows(0, mask_end)), mask_features) if mask_end else None
        estimate = self.stereo_position is not None and prior is None
        wanted = [estimate or g.audio_masks == "all" or (final and g.audio_masks == "final") for g in groups]
        audio_runs = runs(sizes, wanted, key=sources)
        audio_logits = [torch.einsum("bqc,bchw->bqhw", self.audio_mask_embed(rows(a, e)), audios[sources[gs[0]]]["dense"])
                        for a, e, gs in audio_runs]
        if estimate:  # every group is wanted: the runs cover the queries in order, one per audio
            est = [self.stereo_position(rows(a, e), logits, audios[sources[gs[0]]], mask_features.shape[-1],
                                        stereo[sources[gs[0]]]) for (a, e, gs), logits in zip(audio_runs, audio_logits)]
            prior = (cat([b for b, _ in est]), cat([x for _, x in est]))
        if prior is not None and masks is not None:
            masks = masks + (prior[0] if mask_end == total else prior[0][:, :mask_end])  # the stereo column prior
        attn = None
        if not final:
            with torch.no_grad():
                attn = F.interpolate(masks.detach(), size=attn_size, mode="bilinear", align_corners=False)
                attn = attn.sigmoid().flatten(2) < 0.5  # True = blocked
                attn = attn.unsqueeze(1).expand(-1, self.num_heads, -1, -1).flatten(0, 1)
                attn = attn & ~attn.all(-1, keepdim=True)  # never block every key of a query
        audio_logits = per_group(audio_logits, audio_runs, offsets, sizes)
        everything = [(0, total, list(range(len(groups))))]
        embs = per_group([emb], everything, offsets, sizes)
        mask_of = {} if masks is None else per_group([masks], [(0, mask_end, [
            g for g in range(len(groups)) if offsets[g] + sizes[g] <= mask_end])], offsets, sizes)
        x_hat = {} if prior is None else per_group([prior[1]], everything, offsets, sizes)
        preds = []
        for g, group in enumerate(groups):
            pred = {}
            if g in mask_of:
                pred["pred_masks"] = mask_of[g]
            pred["query_embeddings"] = embs[g]
            if group.audio_masks == "all" or (final and group.audio_masks == "final"):
                pred["pred_audio_masks"] = audio_logits[g]
            if g in x_hat:
                pred["pred_stereo_x"] = x_hat[g]
            preds.append(pred)
        return preds, attn, prior, emb

    def _classify(self, predictions, embeddings, layout, which) -> None:
        """Class logits "pred_logits" of the classifying groups at the predictions ``which``, from one
        class-head call per stretch of such groups over those predictions' embeddings together
        (the head is per query, so this is the per-prediction computation in fewer calls)."""
        groups, sizes, offsets = layout
        per_prediction = self.class_predictor.num_predictions > 1  # its own state per prediction: one call each
        for start, end, members in runs(sizes, [g.classify for g in groups]):
            n = end - start
            if per_prediction:
                logits_of = [self.class_predictor(embeddings[i][:, start:end], prediction=i) for i in which]
            else:
                logits_of = self.class_predictor(cat([embeddings[i][:, start:end] for i in which])).split(n, dim=1)
            for i, logits in zip(which, logits_of):
                for g, value in per_group([logits], [(start, end, members)], offsets, sizes).items():
                    predictions[i][g]["pred_logits"] = value

    def forward(self, x: List[torch.Tensor], mask_features: torch.Tensor, audio: Dict[str, torch.Tensor],
                queries: Optional[torch.Tensor] = None, query_pos: Optional[torch.Tensor] = None,
                query_padding_mask: Optional[torch.Tensor] = None, audio_masks: bool = False) -> Dict:
        """
        Args:
            x: 3 visual maps (B, in_channels, h_l, w_l), coarsest first.
            mask_features: ũ_v (B, MASK_DIM, H/4, W/4).
            audio: dict with "tokens" (B, L, D), "tokens_pos" (B, L, D), "dense" ũ_a (B, D_a, T', F');
                with the stereo position on also "stereo_x", "stereo_log_energy" (B, T', F')
                (stereo_position.stereo_cues) and optionally "stereo_frame" (B, 2).
            queries / query_pos: (B, Q, D) custom queries (None: the N learnable ones); query_pos
                None with custom queries means no positional embedding.
            query_padding_mask: (B, Q) bool, True = padding (ignored as a self-attention key).
            audio_masks: also predict audio masks "pred_audio_masks" (B, Q, T', F') at every layer.
        Returns: dict pred_logits, pred_masks, query_embeddings (final layer) [, pred_audio_masks]
            [, pred_stereo_x (B, Q): the stereo position's x̂, when on],
            audio_pred_logits, aux_outputs (list of per-layer dicts with the same keys; in eval mode
            without "pred_logits": the class head runs only where inference reads it), and
            query_padding_mask when given.
        """
        group = QueryGroup(queries, query_pos, query_padding_mask, audio_masks="all" if audio_masks else "none")
        return self.forward_groups(x, mask_features, [audio], [group])[0]

    def forward_groups(self, x: List[torch.Tensor], mask_features: torch.Tensor,
                       audios: Sequence[Dict[str, torch.Tensor]], groups: Sequence[QueryGroup]) -> List[Dict]:
        """One decoder pass over several query groups (query_groups.py): no group sees another,
        each hears ``audios[group.audio]``. ``x``, ``mask_features`` and every audio dict as in
        ``forward``. Returns one outputs dict per group, with ``forward``'s keys where the group
        asks for them (no "pred_logits" without ``classify``, no final "pred_masks" without
        ``masks``, "pred_audio_masks" as ``audio_masks`` says)."""
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature maps, got {len(x)}")
        if not groups or any(not 0 <= g.audio < len(audios) for g in groups):
            raise ValueError(f"every query group must hear one of the {len(audios)} audio dicts passed to "
                             f"forward_groups, got audio indices {[g.audio for g in groups]}")
        b = mask_features.shape[0]
        srcs, poss, sizes = [], [], []
        for i in range(self.num_feature_levels):
            sizes.append(tuple(x[i].shape[-2:]))
            poss.append(self.pe_layer(x[i]).flatten(2).transpose(1, 2))
            srcs.append(self.input_proj[i](x[i]).flatten(2).transpose(1, 2) + self.level_embed.weight[i])
        starts = [self._initial_queries(b, g.queries, g.query_pos, g.padding_mask) for g in groups]
        counts = [q.shape[1] for q, _, _ in starts]
        offsets = [sum(counts[:g]) for g in range(len(groups))]
        layout = (list(groups), counts, offsets)
        output, qpos = cat([q for q, _, _ in starts]), cat([p for _, p, _ in starts])
        pad = None
        if any(p is not None for _, _, p in starts):
            pad = cat([p if p is not None else torch.zeros(b, n, dtype=torch.bool, device=output.device)
                       for (_, _, p), n in zip(starts, counts)])
        self_mask = self_attention_mask(counts, output.device)
        heard = sorted({g.audio for g in groups})
        tokens, tokens_pos, audio_mask = audio_memory(audios, counts, [g.audio for g in groups])
        stereo = None
        if self.stereo_position is not None:
            if any("stereo_x" not in audios[s] or "stereo_log_energy" not in audios[s] for s in heard):
                raise ValueError("MODEL.AUDIO.STEREO_POSITION.ENABLED but the audio dict has "
                                 "no 'stereo_x' / 'stereo_log_energy' (add stereo_position.stereo_cues(magnitudes, "
                                 "grid); CPM.audio_features does)")
            # per-forward constants of the stereo prior (cues flattened, column grid), per audio
            stereo = {s: self.stereo_position.prepare(audios[s], mask_features.shape[-1]) for s in heard}

        predictions, embeddings = [], []  # per prediction: one dict per group; the embeddings of all queries
        if self.num_audio_layers == 0:
            pred, attn_mask, prior, emb = self._predict(output, mask_features, audios, layout, sizes[0], stereo)
            predictions.append(pred)
            embeddings.append(emb)
        for j in range(self.num_audio_layers):
            output = self.audio_cross_attention[j](output, tokens, memory_mask=audio_mask, pos=tokens_pos,
                                                   query_pos=qpos)
            output = self.audio_self_attention[j](output, key_padding_mask=pad, query_pos=qpos, attn_mask=self_mask)
            output = self.audio_ffn[j](output)
            pred, attn_mask, prior, emb = self._predict(output, mask_features, audios, layout, sizes[0], stereo)
            predictions.append(pred)
            embeddings.append(emb)
        audio_index = len(predictions) - 1

        for i in range(self.num_layers):
            lvl = i % self.num_feature_levels
            output = self.cross_attention[i](output, srcs[lvl], memory_mask=attn_mask, pos=poss[lvl], query_pos=qpos)
            output = self.self_attention[i](output, key_padding_mask=pad, query_pos=qpos, attn_mask=self_mask)
            output = self.ffn[i](output)
            # the visual layers reuse the last audio prediction's stereo prior (they do not hear the audio)
            pred, attn_mask, _, emb = self._predict(output, mask_features, audios, layout,
                                                    sizes[(i + 1) % self.num_feature_levels], stereo, prior,
                                                    final=i == self.num_layers - 1)
            predictions.append(pred)
            embeddings.append(emb)
        # classes at every prediction in training; at inference only the last audio prediction
        # (coverage) and the final one need them
        which = list(range(len(predictions))) if self.training else [audio_index, len(predictions) - 1]
        self._classify(predictions, embeddings, layout, which)
        audio_preds = predictions[audio_index]

        outs = []
        for g, group in enumerate(groups):
            out = dict(predictions[-1][g])
            if "pred_logits" in audio_preds[g]:
                out["audio_pred_logits"] = audio_preds[g]["pred_logits"]
            out["aux_outputs"] = [p[g] for p in predictions[:-1]]
            if group.padding_mask is not None:
                out["query_padding_mask"] = group.padding_mask.to(torch.bool)
            outs.append(out)
        return outs
