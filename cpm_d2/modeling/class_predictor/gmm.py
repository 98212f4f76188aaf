"""CCDM: a class predictor that scores mask embeddings by per-class Gaussian mixtures (paper §3.2).

The mixtures, their memory banks and EM live in :class:`~.mixture.ClassMixtures`; this module
turns their densities into class logits (and gives CPM its prompts: their draws, optionally through
a learned adapter, or learned rows). For every class c in 0..C (C classes with background, and
"no object" at index C):

    log p(q~ | c) = logsumexp_m [ log pi_cm + log N(q~; mu_cm, Sigma_cm) ]          (eq. 2)

and the class posterior is Bayes' rule under a uniform prior (eq. 1).
"""
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import record_function

from detectron2.config import configurable

from ..decoder_predictions import decoder_predictions
from .base import CLASS_PREDICTOR_REGISTRY, ClassPredictor
from .mixture import ClassMixtures

__all__ = ["GMMClassPredictor", "mixture_options_from_config", "bank_copies"]

# Training-time temperature of the class scores, as a function of D ("learned": exp(t), t a
# parameter initialised at log sqrt(D)). "class_layer_norm" is a layer, not a temperature.
_LOGIT_SCALE = {"per_dim": float, "sqrt_dim": math.sqrt, "none": lambda d: 1.0, "learned": math.sqrt}
LOGIT_NORMS = tuple(_LOGIT_SCALE) + ("class_layer_norm",)
COMPONENT_SCORES = ("logsumexp", "max")
NO_OBJECT_RULES = ("objectness", "softmax", "gmm")
TEST_LOGITS = ("posterior", "tempered")
PROMPT_ADAPTERS = ("none", "linear", "class_offset")
PROMPT_SOURCES = ("gmm", "embedding")
# buffers that lived on the predictor itself before the mixtures became their own module
_MIXTURE_BUFFERS = ("weights", "means", "covariances", "initialized", "bank", "bank_count", "bank_ptr", "bank_iter")


def mixture_options_from_config(cfg) -> dict:
    """The :class:`ClassMixtures` keyword arguments of ``cfg.MODEL.MASK_FORMER.GMM``."""
    g = cfg.MODEL.MASK_FORMER.GMM
    return {
        "num_components": g.NUM_COMPONENTS,
        "covariance": g.COVARIANCE,
        "memory_size": g.MEMORY_SIZE,
        "update_interval": g.UPDATE_INTERVAL,
        "em_iters": g.EM_ITERS,
        "momentum": g.MOMENTUM,
        "eps": g.EPS,
        "eps_class_relative": g.EPS_CLASS_RELATIVE,
        "prompt_eps": g.PROMPT_EPS,
        "prompt_scale": g.PROMPT_SCALE,
        "min_entries": max(2, g.MIN_ENTRIES_PER_COMPONENT * g.NUM_COMPONENTS),
        "reseed_below": g.RESEED_BELOW,
        "reseed": g.RESEED,
        "estep": g.ESTEP,
        "normalize": g.NORMALIZE,
        "max_age": g.MAX_AGE,
        "mean_prior_weight": g.MEAN_PRIOR_WEIGHT,
        "mean_prior_iters": g.MEAN_PRIOR_ITERS,
    }


def bank_copies(cfg) -> int:
    """How many copies of one matched query a bank receives per step: one per decoder prediction
    when one set of mixtures is fed by every prediction (OBSERVE_LAYERS "all" with deep
    supervision, PER_PREDICTION off), else one."""
    mf = cfg.MODEL.MASK_FORMER
    shared = mf.GMM.OBSERVE_LAYERS == "all" and mf.DEEP_SUPERVISION and not mf.GMM.PER_PREDICTION
    return decoder_predictions(cfg) if shared else 1


@CLASS_PREDICTOR_REGISTRY.register()
class GMMClassPredictor(ClassPredictor):
    """Generative class predictor: forward(embeddings (..., D)) -> logits (..., C+1).

    Class score s_c of a query (``component_score``): ``"logsumexp"`` = log p(q~ | c) (eq. 2) or
    ``"max"`` = max_m [log pi_cm + log N(q~; mu_cm, Sigma_cm)] (the best component, as GMMSeg).
    With ``score_eps`` > 0 the Sigma_cm of the scores are the fitted ones with every variance
    raised to at least score_eps (the mixtures themselves are not changed).

    Logits (``logit_norm``):
    * ``"sqrt_dim"`` / ``"per_dim"`` / ``"learned"`` / ``"none"``: in training s_c / sqrt(D), s_c / D,
      s_c / exp(t) with t learned (from log sqrt(D)), or s_c itself. In D = 256 raw log-densities
      differ between classes by hundreds: the posterior is numerically one-hot and a misclassified
      query costs a CE of hundreds with gradients scaled by 1/variance, which swamps the mask
      losses; the temperature keeps the ranking (same argmax) with O(1) logits. In eval mode
      (``test_logits``) ``"posterior"`` gives s_c (eq. 1's posterior exactly), ``"tempered"`` the
      training logits.
    * ``"class_layer_norm"``: a LayerNorm (with its affine) over the scores of the classes, in
      training and at inference (GMMSeg's normalisation over classes).

    "No object" (``no_object``): ``"objectness"`` (a learned logit o; p(no object) = sigmoid(o)
    and the C classes share 1 - sigmoid(o) by their posterior: forward returns log-probabilities
    over C+1), ``"softmax"`` (a learned logit z beside the training logits in one softmax over C+1,
    as Mask2Former's no-object logit: p(no object) = softmax([s_c / T, z])[C], so it depends on how
    close the query is to every class's mixture, not on q alone; at inference with ``"posterior"``
    the C classes share 1 - p(no object) by eq. 1's posterior) or ``"gmm"`` (a mixture fitted to
    the unmatched queries, scored like any class, as the paper pads its classes with no-object).
    The learned logit (o or z) is a linear map of the embedding (``objectness_layers`` 1) or an MLP
    of that many layers (hidden width D, ReLU), as Mask2Former's mask-embedding MLP (one hyperplane
    may not set all C classes' embeddings, spread over the sphere, apart from the unmatched ones).

    Gradients flow into the embeddings (and the objectness / layer-norm / temperature parameters);
    the mixtures are never learned by gradient (their draws carry none). With
    ``learned_mean_offsets`` each component's mean, where it scores queries, is its EM mean plus a
    learned offset o_cm (a (C+1) x M x D parameter per set of mixtures, starting at zero): the class
    losses (the queries' CE and VCP's class term) then train the scores' means discriminatively
    while EM keeps fitting the mixtures and the prompts are drawn from the EM means. ``mixtures`` (a
    ClassMixtures of C+1 mixtures) holds the buffers; with ``"objectness"`` / ``"softmax"`` the
    no-object mixture is never fed nor fitted.

    Per prediction (``num_predictions`` P > 1): the decoder's predictions (its intermediate ones and
    the final one) each get their own C + 1 mixtures, banked and fitted from that prediction's
    matched embeddings and scoring that prediction's queries (``forward(x, prediction=i)``);
    ``mixtures`` is the final prediction's, the one prompts are sampled from, and
    ``aux_mixtures[i]`` prediction i's for i < P - 1. With one set (P = 1) every prediction is
    scored by the same mixtures, fitted to whatever ``observe`` is given.

    Prompts (``sample``): draws of the final prediction's mixtures (eq. 2), passed through
    ``prompt_adapter``: ``"none"`` (the draws as they are), ``"linear"`` (one learned affine map
    A z + b shared by the classes, starting at the identity) or ``"class_offset"`` (z + o_k, a
    learned vector per class starting at zero). The adapters start by returning the draws and are
    trained by the prompting losses (ACP, VCP, PCL) through the prompts; the draws' spread is kept
    (``"class_offset"``) or mapped linearly (``"linear"``). With ``prompts`` ``"embedding"`` the
    prompts are instead a learnable (C+1) x D embedding, one row per label, as the softmax head's
    Point Rep. (the mixtures then only classify).
    """

    can_sample = True

    @configurable
    def __init__(self, *, num_classes: int, embed_dim: int, logit_norm: str = "sqrt_dim",
                 component_score: str = "logsumexp", no_object: str = "objectness",
                 test_logits: str = "posterior", score_eps: float = 0.0, num_predictions: int = 1, seed: int = 0,
                 prompt_adapter: str = "none", prompts: str = "gmm", learned_mean_offsets: bool = False,
                 objectness_layers: int = 1, **mixture_options):
        """
        Args:
            num_classes: C, background included; C + 1 mixtures (C = no object).
            embed_dim: D, the size of the mask embeddings.
            logit_norm / component_score / no_object / test_logits: see the class docstring.
            score_eps: variance floor of the components when they score queries (each diagonal
                variance raised to at least this; 0 = the fitted variances). EM and prompt draws
                use the fitted ones, floored at ``eps`` only.
            num_predictions: P, one set of mixtures per decoder prediction when > 1 (class docstring).
            seed: seeds the prior means and the EM draws (the same on every rank).
            prompt_adapter: "none" | "linear" | "class_offset", what the prompts are after the draw
                (class docstring).
            prompts: "gmm" (draws of the mixtures) | "embedding" (learnable rows), see the class docstring.
            learned_mean_offsets: score with the EM means plus learned offsets (class docstring).
            objectness_layers: layers of the map from an embedding to the no-object logit (1 = linear).
            mixture_options: the remaining :class:`ClassMixtures` arguments (num_components,
                covariance, memory_size, update_interval, em_iters, momentum, eps, prompt_eps,
                prompt_scale, min_entries, reseed_below, reseed, estep, normalize, max_age,
                mean_prior_weight, mean_prior_iters, init_std).
        """
        super().__init__()
        if logit_norm not in LOGIT_NORMS:
            raise ValueError(f"MODEL.MASK_FORMER.GMM.LOGIT_NORM must be one of {LOGIT_NORMS}, got {logit_norm!r}")
        if component_score not in COMPONENT_SCORES:
            raise ValueError(f"MODEL.MASK_FORMER.GMM.COMPONENT_SCORE must be one of {COMPONENT_SCORES}, "
                             f"got {component_score!r}")
        if no_object not in NO_OBJECT_RULES:
            raise ValueError(f"MODEL.MASK_FORMER.GMM.NO_OBJECT must be one of {NO_OBJECT_RULES}, got {no_object!r}")
        if test_logits not in TEST_LOGITS:
            raise ValueError(f"MODEL.MASK_FORMER.GMM.TEST_LOGITS must be one of {TEST_LOGITS}, got {test_logits!r}")
        if score_eps < 0 or (score_eps > 0 and mixture_options.get("covariance", "diag") == "full"):
            raise ValueError(f"MODEL.MASK_FORMER.GMM.SCORE_EPS must be >= 0 and applies to diagonal covariances "
                             f"(COVARIANCE 'diag' / 'tied'), got {score_eps} with "
                             f"{mixture_options.get('covariance', 'diag')!r}")
        if prompt_adapter not in PROMPT_ADAPTERS:
            raise ValueError(f"MODEL.MASK_FORMER.GMM.PROMPT_ADAPTER must be one of {PROMPT_ADAPTERS}, "
                             f"got {prompt_adapter!r}")
        if prompts not in PROMPT_SOURCES:
            raise ValueError(f"MODEL.CPM.GMM_HEAD_PROMPTS must be one of {PROMPT_SOURCES}, got {prompts!r}")
        if int(objectness_layers) != objectness_layers or objectness_layers < 1:
            raise ValueError(f"MODEL.MASK_FORMER.GMM.OBJECTNESS_LAYERS must be an integer >= 1, got {objectness_layers!r}")
        if prompts == "embedding" and prompt_adapter != "none":
            raise ValueError(f"MODEL.MASK_FORMER.GMM.PROMPT_ADAPTER {prompt_adapter!r} maps GMM draws and needs "
                             "MODEL.CPM.GMM_HEAD_PROMPTS 'gmm'; with 'embedding' set it to 'none'")
        self.num_classes = int(num_classes)
        self.embed_dim = int(embed_dim)
        self.prompt_source = prompts
        if prompts == "embedding":
            self.prompts = nn.Embedding(self.num_classes + 1, self.embed_dim)
        self.prompt_adapter = prompt_adapter
        if prompt_adapter == "linear":
            self.prompt_map = nn.Linear(self.embed_dim, self.embed_dim)
            with torch.no_grad():
                self.prompt_map.weight.copy_(torch.eye(self.embed_dim))
                self.prompt_map.bias.zero_()
        elif prompt_adapter == "class_offset":
            self.prompt_offset = nn.Embedding(self.num_classes + 1, self.embed_dim)
            nn.init.zeros_(self.prompt_offset.weight)
        self.logit_norm = logit_norm
        self.component_score = component_score
        self.no_object = no_object
        self.test_logits = test_logits
        self.score_eps = float(score_eps)
        if int(num_predictions) < 1:
            raise ValueError(f"num_predictions must be >= 1, got {num_predictions}")
        self.num_predictions = int(num_predictions)
        self.mixtures = ClassMixtures(num_mixtures=self.num_classes + 1, embed_dim=self.embed_dim, seed=seed,
                                      **mixture_options)
        if self.num_predictions > 1:
            self.aux_mixtures = nn.ModuleList(
                ClassMixtures(num_mixtures=self.num_classes + 1, embed_dim=self.embed_dim, seed=seed + 1 + i,
                              **mixture_options) for i in range(self.num_predictions - 1))
        self.learned_mean_offsets = bool(learned_mean_offsets)
        if self.learned_mean_offsets:
            M = self.mixtures.num_components
            self.mean_offsets = nn.Parameter(
                torch.zeros(self.num_predictions, self.num_classes + 1, M, self.embed_dim))
        self.objectness_layers = int(objectness_layers)
        if no_object in ("objectness", "softmax"):
            if self.objectness_layers == 1:
                self.objectness = nn.Linear(self.embed_dim, 1)
            else:
                layers = []
                for _ in range(self.objectness_layers - 1):
                    layers += [nn.Linear(self.embed_dim, self.embed_dim), nn.ReLU(inplace=True)]
                self.objectness = nn.Sequential(*layers, nn.Linear(self.embed_dim, 1))
        if logit_norm == "learned":
            self.log_temperature = nn.Parameter(torch.tensor(0.5 * math.log(self.embed_dim)))
        if no_object == "softmax":
            # z starts at the training logit of a query at a component's mean with every variance at
            # the floor, so that "no object" and the classes start on one scale
            with torch.no_grad():
                floor_score = -0.5 * self.embed_dim * math.log(2 * math.pi * self.mixtures.eps)
                self._objectness_output().bias.fill_(float(self._training_logits(torch.tensor([floor_score]))[0])
                                           if logit_norm != "class_layer_norm" else 0.0)
        if logit_norm == "class_layer_norm":
            self.class_norm = nn.LayerNorm(self.num_classes + (no_object == "gmm"))

    @classmethod
    def from_config(cls, cfg, *, num_classes, embed_dim):
        g = cfg.MODEL.MASK_FORMER.GMM
        if g.PER_PREDICTION and g.OBSERVE_LAYERS != "all":
            raise ValueError("MODEL.MASK_FORMER.GMM.PER_PREDICTION needs OBSERVE_LAYERS 'all' (each prediction's "
                             f"mixtures are fitted to that prediction's matched embeddings), got {g.OBSERVE_LAYERS!r}")
        return {"num_classes": num_classes, "embed_dim": embed_dim, "logit_norm": g.LOGIT_NORM,
                "component_score": g.COMPONENT_SCORE, "no_object": g.NO_OBJECT, "test_logits": g.TEST_LOGITS,
                "score_eps": g.SCORE_EPS, "prompt_adapter": g.PROMPT_ADAPTER,
                "prompts": cfg.MODEL.CPM.GMM_HEAD_PROMPTS if cfg.MODEL.CPM.ENABLED else "gmm",
                "learned_mean_offsets": g.LEARNED_MEAN_OFFSETS, "objectness_layers": g.OBJECTNESS_LAYERS,
                "num_predictions": decoder_predictions(cfg) if g.PER_PREDICTION else 1,
                **mixture_options_from_config(cfg)}

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes} (+1 no-object), embed_dim={self.embed_dim}, "
                f"logit_norm={self.logit_norm}, component_score={self.component_score}, no_object={self.no_object}, "
                f"test_logits={self.test_logits}, score_eps={self.score_eps}, num_predictions={self.num_predictions}, "
                f"prompt_adapter={self.prompt_adapter}, prompts={self.prompt_source}, "
                f"learned_mean_offsets={self.learned_mean_offsets}, objectness_layers={self.objectness_layers}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written when the mixtures' buffers lived on the predictor itself
        for name in _MIXTURE_BUFFERS:
            old, new = prefix + name, prefix + "mixtures." + name
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------------ scores
    def _check_labels(self, labels: torch.Tensor, what: str) -> None:
        self.mixtures.check_labels(labels, what)

    def _set_index(self, prediction=None) -> int:
        """Which set of mixtures (0..P-1, P-1 = the final one) scores prediction ``prediction``
        (None = the final one; with one set, every prediction is scored by set 0)."""
        if prediction is None or self.num_predictions == 1:
            return self.num_predictions - 1
        i = int(prediction)
        if not 0 <= i < self.num_predictions:
            raise ValueError(f"prediction {i} out of range: this head has {self.num_predictions} predictions")
        return i

    def mixtures_of(self, prediction=None) -> ClassMixtures:
        """The mixtures that score (and are fitted to) prediction ``prediction`` (None = the final one)."""
        i = self._set_index(prediction)
        return self.mixtures if i == self.num_predictions - 1 else self.aux_mixtures[i]

    def class_scores(self, embeddings: torch.Tensor, prediction=None) -> torch.Tensor:
        """Per-class scores s_c (``component_score``, variances floored at ``score_eps``, means
        shifted by the learned offsets if the head has them), float64: (..., D) -> (..., C+1)."""
        mixtures = self.mixtures_of(prediction)
        mixtures._check_embeddings(embeddings, "embeddings")
        offset = self.mean_offsets[self._set_index(prediction)] if self.learned_mean_offsets else None
        comp = mixtures.component_log_prob(embeddings.reshape(-1, self.embed_dim), self.score_eps, offset)
        score = torch.logsumexp(comp, dim=-1) if self.component_score == "logsumexp" else comp.amax(-1)
        return score.reshape(*embeddings.shape[:-1], self.num_classes + 1)

    def log_prob(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Exact class-conditional log-density log p(q~ | c) (eq. 2): (..., D) -> (..., C+1), float32/64."""
        out_dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        return self.mixtures.log_prob(embeddings).to(out_dtype)

    def log_likelihood(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(x_k | c = labels[k]) for embeddings (N, D), labels (N,) -> (N,). For tests / monitoring."""
        self._check_labels(labels, "log_likelihood")
        if embeddings.dim() != 2 or embeddings.shape[0] != labels.shape[0]:
            raise ValueError(f"GMM log_likelihood expects embeddings (N, D) and labels (N,), got "
                             f"{tuple(embeddings.shape)} and {tuple(labels.shape)}")
        logp = self.log_prob(embeddings)
        return logp.gather(1, labels.to(logp.device).long()[:, None]).squeeze(1)

    @record_function("cpm.class_head")
    def forward(self, embeddings: torch.Tensor, prediction=None) -> torch.Tensor:
        """embeddings (..., D) of decoder prediction ``prediction`` (None = the final one) -> logits
        (..., C+1); see the class docstring for the scale and no-object."""
        out_dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            score = self.class_scores(embeddings, prediction).to(out_dtype)
            if self.no_object != "gmm":
                score = score[..., :-1]
            # the LayerNorm over classes applies in training and at inference alike
            tempered = self.training or self.test_logits == "tempered" or self.logit_norm == "class_layer_norm"
            if self.no_object == "softmax":
                z = self.objectness(embeddings.float()).to(out_dtype)
                joint = torch.cat([self._training_logits(score), z], dim=-1)
                if tempered:
                    return joint
                # p(no object) as trained; the C classes share the rest by eq. 1's exact posterior
                log_joint = torch.log_softmax(joint, dim=-1)
                log_object = torch.logsumexp(log_joint[..., :-1], dim=-1, keepdim=True)
                return torch.cat([torch.log_softmax(score, dim=-1) + log_object, log_joint[..., -1:]], dim=-1)
            if tempered:
                score = self._training_logits(score)
            if self.no_object == "gmm":
                return score
            # log-probabilities over C+1 (softmax returns them unchanged): Bayes over the C classes
            # (uniform prior), scaled by 1 - sigmoid(o); "no object" = sigmoid(o)
            o = self.objectness(embeddings.float()).to(out_dtype)
            classes = torch.log_softmax(score, dim=-1) + F.logsigmoid(-o)
            return torch.cat([classes, F.logsigmoid(o)], dim=-1)

    def _objectness_output(self) -> nn.Linear:
        """The last linear layer of the no-object logit's map."""
        return self.objectness if isinstance(self.objectness, nn.Linear) else self.objectness[-1]

    def _training_logits(self, score: torch.Tensor) -> torch.Tensor:
        """Class scores (..., K) -> the training logits (``logit_norm``: a temperature or the LayerNorm)."""
        if self.logit_norm == "class_layer_norm":
            return self.class_norm(score.float()).to(score.dtype)
        if self.logit_norm == "learned":
            return score / self.log_temperature.exp()
        if self.logit_norm != "none":
            return score / _LOGIT_SCALE[self.logit_norm](self.embed_dim)
        return score

    # ------------------------------------------------------------------------------ the mixtures
    def observe(self, embeddings: torch.Tensor, labels: torch.Tensor, iteration: int = 0, sources=None,
                predictions=None) -> None:
        """Bank matched embeddings (N, D) with labels (N,) in [0, C]; unless ``no_object`` is ``"gmm"`` the
        no-object ones (label C) are left out (no mixture to fit). ``predictions`` (N,) (host):
        each row's decoder prediction (None = the final one); with one set of mixtures for all
        predictions it is ignored. A collective under DDP (every rank calls it, one call per set)."""
        self._check_labels(labels, "observe")
        if self.no_object != "gmm":
            keep = labels < self.num_classes
            embeddings, labels = embeddings[keep], labels[keep]
            sources = None if sources is None else sources[keep]
            predictions = None if predictions is None else predictions[keep.to(predictions.device)]
        if self.num_predictions == 1:
            self.mixtures.observe(embeddings, labels, iteration, sources)
            return
        if predictions is None:
            predictions = torch.full(labels.shape, self.num_predictions - 1, dtype=torch.long)
        for i in range(self.num_predictions):
            rows = (predictions == i).to(labels.device)
            self.mixtures_of(i).observe(embeddings[rows], labels[rows], iteration,
                                        None if sources is None else sources[rows.to(sources.device)])

    def _all_mixtures(self):
        return [self.mixtures] + (list(self.aux_mixtures) if self.num_predictions > 1 else [])

    def step(self, iteration: int) -> None:
        for mixtures in self._all_mixtures():
            mixtures.step(iteration)

    def update(self, iteration: int = 0) -> bool:
        """EM on every set of mixtures now; True if any was fitted."""
        return any([mixtures.update(iteration) for mixtures in self._all_mixtures()])

    def bank_age(self, iteration: int) -> torch.Tensor:
        return self.mixtures.bank_age(iteration)

    def can_prompt(self, labels: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the labels whose mixture has been fitted (the others are not sampled from);
        every label with ``prompts`` ``"embedding"``."""
        if self.prompt_source == "embedding":
            return super().can_prompt(labels)
        return self.mixtures.fitted[labels.to(self.mixtures.fitted.device).long()]

    def sample(self, labels: torch.Tensor, generator=None) -> torch.Tensor:
        """One class-conditional prompt per label: labels (N,) -> (N, D), a draw of the label's
        mixture through ``prompt_adapter`` (with gradient into the adapter, none into the draw), or
        the label's learnable row with ``prompts`` ``"embedding"``."""
        if self.prompt_source == "embedding":
            self._check_labels(labels, "sample")
            return self.prompts(labels.to(self.prompts.weight.device).long())
        z = self.mixtures.sample(labels, generator)
        if self.prompt_adapter == "linear":
            return self.prompt_map(z.to(self.prompt_map.weight.dtype))
        if self.prompt_adapter == "class_offset":
            offset = self.prompt_offset(labels.to(self.prompt_offset.weight.device).long())
            return z.to(offset.dtype) + offset
        return z
