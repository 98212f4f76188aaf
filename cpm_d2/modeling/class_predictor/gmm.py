"""CCDM: a class predictor that models p(q~ | c) with one Gaussian mixture per class.

Paper §3.2, eqs. 1-4. For every class c in 0..C (C classes with background, plus "no object" at
index C) the predictor holds a mixture of M Gaussians over the D-dim mask embeddings q~:

    log p(q~ | c) = logsumexp_m [ log pi_cm + log N(q~; mu_cm, Sigma_cm) ]          (eq. 2)

and classifies with Bayes' rule under a uniform prior (eq. 1). The mixture parameters are never
learned by gradient: a per-class memory bank (ring buffer of detached, matched embeddings,
gathered across ranks) feeds EM (eqs. 3-4) every UPDATE_INTERVAL iterations, and the EM estimate
is blended into the current parameters with momentum. Every piece of state is a buffer, so it is
checkpointed and, by construction, identical on every rank.
"""
import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.profiler import record_function

from detectron2.config import configurable
from detectron2.utils import comm

from .base import CLASS_PREDICTOR_REGISTRY, ClassPredictor

__all__ = ["GMMClassPredictor"]

_LOG_2PI = math.log(2.0 * math.pi)
_TINY = 1e-12  # guards divisions by an (almost) empty responsibility mass
_MIN_WEIGHT = 1e-6  # mixing weights are floored here so log(pi) stays finite
_DEAD = 1e-6  # a component whose responsibility mass is below this keeps its mean/covariance
# Training-time temperature of the class logits (LOGIT_NORM), as a function of D.
# "learned": exp(t), t a parameter initialised at log sqrt(D).
_LOGIT_SCALE = {"per_dim": float, "sqrt_dim": math.sqrt, "none": lambda d: 1.0, "learned": math.sqrt}


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.where with ``mask`` (C1,) broadcast over the trailing dims of ``a``/``b``."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


@CLASS_PREDICTOR_REGISTRY.register()
class GMMClassPredictor(ClassPredictor):
    """Generative class predictor: one M-component Gaussian mixture per class (C + 1 mixtures).

    forward(embeddings (..., D)) -> logits (..., C+1) with, in training mode,
        logits = log p(q~ | c) / sqrt(D)  (``logit_norm="sqrt_dim"``, the default), / D (``"per_dim"``),
        / a learned temperature (``"learned"``), or exactly log p(q~ | c) (``"none"``),
    and in eval mode always logits = log p(q~ | c): inference uses eq. 1's posterior exactly.

    With ``"none"`` softmax(logits) is exactly eq. 1's posterior (uniform prior). In D = 256 these
    log-densities are of order 1e2-1e4 and differ between classes by hundreds, so the posterior is
    numerically one-hot and a misclassified query costs a cross-entropy of hundreds with
    gradients scaled by 1/variance, which swamps the mask losses under full-model gradient
    clipping. ``"per_dim"`` therefore divides the log-density by D (the average per-dimension
    log-likelihood), i.e. softmax(logits) is the Bayes posterior of the tempered likelihood
    p(q~|c)^(1/D) (temperature D): it keeps the ranking of eq. 1 (same argmax), gives O(1)
    logits and a non-saturated posterior for the Hungarian class cost. The log-density itself
    (exact, unscaled) is ``log_prob``; ``log_likelihood`` evaluates it at given labels.

    The tempering is a training device only (finite CE, an informative matching cost). At test
    time the semantic output is sum_i p_i(c) sigma(m_i): a tempered, flatter posterior lets the
    no-object queries leak score into every class and shrinks the objects (measured on the
    synthetic demo: 75.0 -> 81.0 test mIoU for the same weights with the exact posterior), so
    eval mode returns the exact log-density.

    "No object" (∅, index C): with ``no_object="objectness"`` (default) a learned logit o scores it,
    p(∅) = sigmoid(o), and the C classes share 1 - sigmoid(o) by the GMM posterior above, so
    forward returns log-probabilities over C+1 (their softmax is that distribution; prompts are
    only ever drawn for classes). With ``"gmm"`` ∅ gets a mixture like every class; the
    unmatched queries are diverse (silent objects, background) and that broad mixture loses to the
    tight class mixtures, so at test time unmatched queries are called objects (see the config's
    MODEL.CPM.GMM.NO_OBJECT comment for the measurement).

    Gradients flow into the embeddings (and the objectness layer); the mixtures are never learned
    by gradient. Buffers:
        weights (C+1, M), means (C+1, M, D), covariances (C+1, M, D) for "diag" or
        (C+1, M, D, D) for "full", initialized (C+1,) bool, bank (C+1, S, D), bank_count (C+1,),
        bank_ptr (C+1,), bank_iter (C+1, S) (the training iteration each entry was stored at) with
        S = memory_size.

    Freshness: the prompts follow the embedding space only as closely as the bank and the
    parameters do. ``bank_age(it)`` is the mean age of a class's entries in iterations (logged by
    the meta-architecture as ``gmm_bank_age``); with ``max_age`` > 0, EM ignores older entries.
    EM every K iterations blended with momentum m adds a lag of about K / (1 - m) iterations.

    Numerics: diagonal log-densities are evaluated in float64 through the expansion
    sum((x - mu)^2 / v) = x^2.(1/v) - 2 x.(mu/v) + mu^2.(1/v) (matrix products, no (K, C+1, M, D)
    intermediate); full covariances use the whitened difference L^-1 (x - mu) in float32 (float64
    for float64 input), which needs a (K, C+1, M, D) intermediate: full covariances are meant for
    small D or few classes (full EM at C+1 = 72, S = 512, D = 256 takes ~15 s on 2 CPU cores).
    EM runs in float64. Autocast is disabled inside the module.
    """

    can_sample = True

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        embed_dim: int,
        num_components: int = 3,
        covariance: str = "diag",
        memory_size: int = 512,
        update_interval: int = 10,
        em_iters: int = 3,
        momentum: float = 0.9,
        eps: float = 1e-4,
        logit_norm: str = "sqrt_dim",
        init_std: float = 1.0,
        seed: int = 0,
        max_age: int = 0,
        no_object: str = "objectness",
    ):
        """
        Args:
            num_classes: C, background included; the module holds C + 1 mixtures (C = no object).
            embed_dim: D, the size of the mask embeddings.
            num_components: M Gaussians per class.
            covariance: "diag" or "full".
            memory_size: S, embeddings kept per class in the ring buffer.
            update_interval: ``step(it)`` runs EM when ``(it + 1) % update_interval == 0``.
            em_iters: EM iterations per update.
            momentum: theta <- momentum * theta_old + (1 - momentum) * theta_EM (not applied the
                first time a class is estimated).
            eps: variance floor (diag: var >= eps; full: Sigma + eps * I).
            logit_norm: "per_dim" (log-density / D), "sqrt_dim" (log-density / sqrt(D)), "learned"
                (log-density / exp(t), t learned from log sqrt(D)) or "none" (exact log-density).
            init_std: std of the random initial means (unit initial variances).
            seed: seeds the initial means and the EM initialisation draws (same on every rank).
            max_age: > 0: EM uses only bank entries stored at most this many iterations ago.
            no_object: how "no object" is scored: "objectness" (a learned logit o:
                p(no object) = sigmoid(o), p(c) = (1 - sigmoid(o)) p_GMM(c | q)) or "gmm" (a
                mixture over the unmatched queries' embeddings, scored like any class).
        """
        super().__init__()
        where = "cpm_d2/modeling/class_predictor/gmm.py"
        if covariance not in ("diag", "full"):
            raise ValueError(f"{where}: covariance must be 'diag' or 'full', got {covariance!r}")
        if logit_norm not in _LOGIT_SCALE:
            raise ValueError(f"{where}: logit_norm must be one of {sorted(_LOGIT_SCALE)}, got {logit_norm!r}")
        for name, value in (
            ("num_classes", num_classes),
            ("embed_dim", embed_dim),
            ("num_components", num_components),
            ("memory_size", memory_size),
            ("update_interval", update_interval),
            ("em_iters", em_iters),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{where}: momentum must be in [0, 1), got {momentum}")
        if eps <= 0:
            raise ValueError(f"{where}: eps (covariance floor) must be > 0, got {eps}")

        self.num_classes = int(num_classes)
        self.embed_dim = int(embed_dim)
        self.num_components = int(num_components)
        self.covariance = covariance
        self.memory_size = int(memory_size)
        self.update_interval = int(update_interval)
        self.em_iters = int(em_iters)
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.logit_norm = logit_norm
        self.seed = int(seed)
        if int(max_age) != max_age or max_age < 0:
            raise ValueError(f"{where}: max_age must be an integer >= 0, got {max_age!r}")
        self.max_age = int(max_age)
        if no_object not in ("objectness", "gmm"):
            raise ValueError(f"{where}: no_object must be 'objectness' or 'gmm', got {no_object!r}")
        self.no_object = no_object
        if no_object == "objectness":
            self.objectness = torch.nn.Linear(self.embed_dim, 1)
        if logit_norm == "learned":
            self.log_temperature = torch.nn.Parameter(torch.tensor(0.5 * math.log(self.embed_dim)))

        C1, M, D, S = self.num_classes + 1, self.num_components, self.embed_dim, self.memory_size
        gen = torch.Generator().manual_seed(self.seed)
        self.register_buffer("weights", torch.full((C1, M), 1.0 / M))
        self.register_buffer("means", torch.randn(C1, M, D, generator=gen) * float(init_std))
        if covariance == "diag":
            self.register_buffer("covariances", torch.ones(C1, M, D))
        else:
            self.register_buffer("covariances", torch.eye(D).expand(C1, M, D, D).clone())
        self.register_buffer("initialized", torch.zeros(C1, dtype=torch.bool))
        self.register_buffer("bank", torch.zeros(C1, S, D))
        self.register_buffer("bank_count", torch.zeros(C1, dtype=torch.long))
        self.register_buffer("bank_ptr", torch.zeros(C1, dtype=torch.long))
        self.register_buffer("bank_iter", torch.zeros(C1, S, dtype=torch.long))
        self._factor_cache = None  # full covariance: (key, L, L^-1, log|Sigma|)
        self._diag_cache = None  # diagonal covariance: (key, 1/var, mu/var, sum mu^2/var, log-normaliser + log pi)

    @classmethod
    def from_config(cls, cfg, *, num_classes, embed_dim):
        g = cfg.MODEL.CPM.GMM
        return {
            "num_classes": num_classes,
            "embed_dim": embed_dim,
            "num_components": g.NUM_COMPONENTS,
            "covariance": g.COVARIANCE,
            "memory_size": g.MEMORY_SIZE,
            "update_interval": g.UPDATE_INTERVAL,
            "em_iters": g.EM_ITERS,
            "momentum": g.MOMENTUM,
            "eps": g.EPS,
            "logit_norm": g.LOGIT_NORM,
            "max_age": g.MAX_AGE,
            "no_object": g.NO_OBJECT,
        }

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes} (+1 no-object), embed_dim={self.embed_dim}, "
            f"num_components={self.num_components}, covariance={self.covariance}, "
            f"memory_size={self.memory_size}, update_interval={self.update_interval}, "
            f"em_iters={self.em_iters}, momentum={self.momentum}, eps={self.eps}, "
            f"logit_norm={self.logit_norm}, max_age={self.max_age}, no_object={self.no_object}"
        )

    # ------------------------------------------------------------------------------ densities
    def _check_embeddings(self, x: torch.Tensor, what: str) -> None:
        if x.dim() < 1 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"cpm_d2/modeling/class_predictor/gmm.py: {what} must have shape (..., {self.embed_dim}), "
                f"got {tuple(x.shape)}"
            )

    def _check_labels(self, labels: torch.Tensor, what: str) -> None:
        if labels.dim() != 1:
            raise ValueError(
                f"cpm_d2/modeling/class_predictor/gmm.py: {what} labels must be 1-D, got {tuple(labels.shape)}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(
                f"cpm_d2/modeling/class_predictor/gmm.py: {what} labels must lie in [0, {self.num_classes}] "
                f"(C = {self.num_classes} is no-object), got range [{int(labels.min())}, {int(labels.max())}]"
            )

    def _full_factors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cholesky factor L, its inverse and log|Sigma| of every component (float64), cached.

        The cache key is the covariance buffer's storage, device and version counter, so any
        in-place update (EM, ``load_state_dict``) or ``.to()`` invalidates it.
        """
        cov = self.covariances
        key = (cov.data_ptr(), cov.device, cov._version)
        if self._factor_cache is None or self._factor_cache[0] != key:
            L, info = torch.linalg.cholesky_ex(cov.double())
            if bool((info != 0).any()):
                raise RuntimeError(
                    "cpm_d2/modeling/class_predictor/gmm.py: a full covariance is not positive definite "
                    "(corrupt checkpoint or eps too small)"
                )
            eye = torch.eye(self.embed_dim, dtype=L.dtype, device=L.device).expand_as(L)
            L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
            logdet = 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            self._factor_cache = (key, L, L_inv, logdet)
        return self._factor_cache[1:]

    def _diag_terms(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float64 per-component terms of the diagonal log-density, flattened over (C+1) x M = CM:
        1/var (D, CM), mu/var (D, CM), sum_d mu^2/var (CM,) and -0.5 (D log 2pi + log|Sigma|) + log pi (CM,).

        They depend on the buffers only, so they are cached (every decoder layer of every iteration
        would otherwise recompute them) under the buffers' storage, device and version counters:
        any in-place update (EM, ``load_state_dict``) or ``.to()`` invalidates the cache.
        """
        bufs = (self.weights, self.means, self.covariances)
        key = tuple((t.data_ptr(), t.device, t._version) for t in bufs)
        if self._diag_cache is None or self._diag_cache[0] != key:
            C1, M, D = self.num_classes + 1, self.num_components, self.embed_dim
            var = self.covariances.double().reshape(C1 * M, D)
            mu = self.means.double().reshape(C1 * M, D)
            inv = var.reciprocal()
            log_w = self.weights.double().clamp_min(_TINY).log().reshape(C1 * M)
            const = -0.5 * (D * _LOG_2PI + var.log().sum(-1)) + log_w
            self._diag_cache = (key, inv.t().contiguous(), (mu * inv).t().contiguous(), (mu * mu * inv).sum(-1), const)
        return self._diag_cache[1:]

    def _component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """x (K, D) -> log pi_cm + log N(x; mu_cm, Sigma_cm) for every class and component: (K, C+1, M)."""
        C1, M, D = self.num_classes + 1, self.num_components, self.embed_dim
        if self.covariance == "diag":
            inv_t, mu_inv_t, mu2_inv, const = self._diag_terms()
            x = x.double()
            # sum((x - mu)^2 / var) = x^2 . (1/var) - 2 x . (mu/var) + mu^2 . (1/var), as two fused matmuls
            quad = torch.addmm(torch.addmm(mu2_inv, x, mu_inv_t, alpha=-2.0), x * x, inv_t).clamp_min(0.0)  # (K, CM)
            return (const - 0.5 * quad).reshape(-1, C1, M)
        log_w = self.weights.double().clamp_min(_TINY).log()  # (C1, M)
        _, L_inv, logdet = self._full_factors()
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        diff = x.to(dt)[:, None, None, :] - self.means.to(dt)  # (K, C1, M, D)
        white = torch.einsum("cmde,kcme->kcmd", L_inv.to(dt), diff)
        quad = white.pow(2).sum(-1).double().reshape(-1, C1 * M)
        logdet = logdet.reshape(C1 * M)
        log_n = -0.5 * (D * _LOG_2PI + logdet + quad)
        return log_n.reshape(-1, C1, M) + log_w

    def log_prob(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Exact class-conditional log-density log p(q~ | c): (..., D) -> (..., C+1), float32/64."""
        self._check_embeddings(embeddings, "embeddings")
        lead = embeddings.shape[:-1]
        out_dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            comp = self._component_log_prob(embeddings.reshape(-1, self.embed_dim))
            out = torch.logsumexp(comp, dim=-1)
        return out.to(out_dtype).reshape(*lead, self.num_classes + 1)

    @record_function("cpm.class_head")
    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings (..., D) -> logits (..., C+1); see the class docstring for the scale and ∅."""
        logp = self.log_prob(embeddings)
        if self.training and self.logit_norm == "learned":
            logp = logp / self.log_temperature.exp()
        elif self.training and self.logit_norm != "none":
            logp = logp / _LOGIT_SCALE[self.logit_norm](self.embed_dim)
        if self.no_object == "gmm":
            return logp
        # log-probabilities over C+1 (softmax returns them unchanged): Bayes over the C classes
        # (uniform prior), scaled by the objectness 1 - sigmoid(o); "no object" = sigmoid(o)
        o = self.objectness(embeddings).float()
        classes = torch.log_softmax(logp[..., :-1], dim=-1) + F.logsigmoid(-o)
        return torch.cat([classes, F.logsigmoid(o)], dim=-1).to(logp.dtype)

    def log_likelihood(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(x_k | c = labels[k]) for embeddings (K, D), labels (K,) -> (K,). For tests / monitoring."""
        self._check_embeddings(embeddings, "embeddings")
        self._check_labels(labels, "log_likelihood")
        if embeddings.dim() != 2 or embeddings.shape[0] != labels.shape[0]:
            raise ValueError(
                "cpm_d2/modeling/class_predictor/gmm.py: log_likelihood expects embeddings (K, D) and labels "
                f"(K,), got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
            )
        logp = self.log_prob(embeddings)
        return logp.gather(1, labels.to(logp.device).long()[:, None]).squeeze(1)

    # ------------------------------------------------------------------------------ memory bank
    @staticmethod
    def _all_gather_rows(emb: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Concatenate (K_r, D) / (K_r,) from every rank, in rank order (variable K_r: pad to max)."""
        world = comm.get_world_size()
        if world == 1:
            return emb, labels
        size = torch.tensor([labels.numel()], dtype=torch.long, device=emb.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        sizes = [int(s.item()) for s in sizes]
        k_max = max(sizes)
        if k_max == 0:
            return emb, labels
        pad = k_max - labels.numel()
        emb_p = F.pad(emb, (0, 0, 0, pad))
        lab_p = F.pad(labels, (0, pad), value=-1)
        embs = [torch.empty_like(emb_p) for _ in range(world)]
        labs = [torch.empty_like(lab_p) for _ in range(world)]
        dist.all_gather(embs, emb_p.contiguous())
        dist.all_gather(labs, lab_p.contiguous())
        emb = torch.cat([e[:n] for e, n in zip(embs, sizes)])
        labels = torch.cat([l[:n] for l, n in zip(labs, sizes)])
        return emb, labels

    @torch.no_grad()
    def _push(self, emb: torch.Tensor, labels: torch.Tensor, iteration: int = 0) -> None:
        """Write (K, D) embeddings into the class ring buffers, newest last, without Python loops."""
        K = labels.numel()
        if K == 0:
            return
        C1, S = self.num_classes + 1, self.memory_size
        order = torch.argsort(labels, stable=True)  # group by class, keep arrival order inside
        lab = labels[order]
        emb = emb[order]
        counts = torch.bincount(lab, minlength=C1)  # (C1,)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(K, device=lab.device) - starts[lab]  # arrival index within its class
        keep = rank >= counts[lab] - S  # only the newest S of a class survive this batch
        slot = (self.bank_ptr[lab] + rank) % S  # distinct for the kept ones
        self.bank[lab[keep], slot[keep]] = emb[keep]
        self.bank_iter[lab[keep], slot[keep]] = int(iteration)
        self.bank_ptr.copy_((self.bank_ptr + counts) % S)
        self.bank_count.copy_((self.bank_count + counts).clamp_max(S))

    @torch.no_grad()
    @record_function("gmm.observe")
    def observe(self, embeddings: torch.Tensor, labels: torch.Tensor, iteration: int = 0) -> None:
        """Store detached matched embeddings (K, D) with labels (K,) in [0, C] (C = no object),
        stamped with the training ``iteration``.

        When torch.distributed is initialised this is a collective: every rank must call it (with
        K possibly 0); the rows of all ranks are gathered in rank order so every rank's bank is the same.
        """
        if embeddings.dim() != 2 or embeddings.shape[-1] != self.embed_dim:
            raise ValueError(
                f"cpm_d2/modeling/class_predictor/gmm.py: observe expects embeddings (K, {self.embed_dim}), "
                f"got {tuple(embeddings.shape)}"
            )
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(
                "cpm_d2/modeling/class_predictor/gmm.py: observe expects labels (K,) matching embeddings "
                f"(K, D), got {tuple(labels.shape)} and {tuple(embeddings.shape)}"
            )
        self._check_labels(labels, "observe")
        emb = embeddings.detach().to(device=self.bank.device, dtype=self.bank.dtype)
        lab = labels.detach().to(device=self.bank.device, dtype=torch.long)
        if self.no_object == "objectness":  # "no object" has no mixture to fit
            keep = lab < self.num_classes
            emb, lab = emb[keep], lab[keep]
        emb, lab = self._all_gather_rows(emb, lab)
        self._push(emb, lab, iteration)

    def bank_valid_mask(self, iteration: Optional[int] = None) -> torch.Tensor:
        """(C+1, S) bool: which bank slots hold an embedding (slots fill from 0 before wrapping) and,
        with ``max_age`` > 0 and ``iteration`` given, were stored at most ``max_age`` iterations ago."""
        slots = torch.arange(self.memory_size, device=self.bank.device)
        valid = slots[None, :] < self.bank_count[:, None]
        if self.max_age > 0 and iteration is not None:
            valid &= self.bank_iter >= int(iteration) - self.max_age
        return valid

    @torch.no_grad()
    def bank_age(self, iteration: int) -> torch.Tensor:
        """(C+1,) mean age in iterations of each class's stored entries (NaN for an empty bank)."""
        valid = self.bank_valid_mask()
        age = (int(iteration) - self.bank_iter).to(torch.float64) * valid
        return (age.sum(1) / valid.sum(1)).to(torch.float32)  # 0 / 0 = NaN where empty

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before bank_iter existed: their entries' ages are unknown (taken as 0)
        key = prefix + "bank_iter"
        if prefix + "bank" in state_dict and key not in state_dict:
            state_dict[key] = torch.zeros_like(self.bank_iter)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------------ EM
    def _paired_log_normal(self, x: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """Class-paired log N: x (C1, S, D), mu (C1, M, D), cov (C1, M, D[, D]) (float64) -> (C1, S, M)."""
        D = x.shape[-1]
        if self.covariance == "diag":
            inv = cov.reciprocal()
            quad = (x * x) @ inv.transpose(1, 2) - 2.0 * (x @ (mu * inv).transpose(1, 2))
            quad = (quad + (mu * mu * inv).sum(-1)[:, None, :]).clamp_min(0.0)
            logdet = cov.log().sum(-1)  # (C1, M)
        else:
            L = torch.linalg.cholesky(cov)
            eye = torch.eye(D, dtype=L.dtype, device=L.device).expand_as(L)
            L_inv = torch.linalg.solve_triangular(L, eye, upper=False)  # (C1, M, D, D)
            diff = x[:, :, None, :] - mu[:, None, :, :]  # (C1, S, M, D)
            quad = torch.einsum("cmde,csme->csmd", L_inv, diff).pow(2).sum(-1)
            logdet = 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return -0.5 * (D * _LOG_2PI + logdet[:, None, :] + quad)

    def _class_moments(self, X: torch.Tensor, valid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Per-class covariance of the bank (diag: (C1, D); full: (C1, D, D)), floored by eps."""
        w = valid.to(X.dtype)[..., None]  # (C1, S, 1)
        cnt = n.clamp_min(1).to(X.dtype)[:, None]  # (C1, 1)
        mean = (w * X).sum(1) / cnt
        centred = (X - mean[:, None]) * w
        if self.covariance == "diag":
            return (centred.pow(2).sum(1) / cnt).clamp_min(self.eps)
        cov = centred.transpose(1, 2) @ centred / cnt[..., None]
        eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
        return 0.5 * (cov + cov.transpose(1, 2)) + self.eps * eye

    def _init_from_bank(self, X, valid, n, iteration):
        """k-means++ seeding of M means per class from its bank samples (all classes at once).

        Draws use a CPU generator seeded from (seed, iteration): identical on every rank.
        Returns weights (C1, M), means (C1, M, D), covariances (class-wide covariance per component).
        """
        C1, S, D = X.shape
        M = self.num_components
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(iteration))
        rows = torch.arange(C1, device=X.device)
        valid_cpu = valid.cpu().double()
        base = valid_cpu.clone()
        base[base.sum(1) == 0] = 1.0  # classes without samples: dummy draw, result unused
        chosen = torch.multinomial(base, 1, generator=gen)  # (C1, 1) on CPU
        centre = X[rows, chosen[:, 0].to(X.device)]  # (C1, D)
        d2 = (X - centre[:, None]).pow(2).sum(-1)  # (C1, S)
        for _ in range(1, M):
            wts = (d2 * valid).cpu()
            fallback = base.clone()
            fallback.scatter_(1, chosen, 0.0)  # uniform over not-yet-chosen samples
            fallback[fallback.sum(1) == 0] = 1.0
            wts = torch.where(wts.sum(1, keepdim=True) > 0, wts, fallback)
            nxt = torch.multinomial(wts, 1, generator=gen)
            chosen = torch.cat([chosen, nxt], dim=1)
            centre = X[rows, nxt[:, 0].to(X.device)]
            d2 = torch.minimum(d2, (X - centre[:, None]).pow(2).sum(-1))
        means = X[rows[:, None], chosen.to(X.device)]  # (C1, M, D)
        cov = self._class_moments(X, valid, n)
        cov = cov[:, None].expand(C1, M, *cov.shape[1:]).clone()
        weights = torch.full((C1, M), 1.0 / M, dtype=X.dtype, device=X.device)
        return weights, means, cov

    def _em_iteration(self, X, valid, n, w, mu, cov):
        """One E-step (eq. 3) + M-step (eq. 4) for all classes/components at once (float64)."""
        log_r = self._paired_log_normal(X, mu, cov) + w.clamp_min(_TINY).log()[:, None, :]
        resp = torch.softmax(log_r, dim=-1) * valid[..., None].to(X.dtype)  # (C1, S, M)
        nk = resp.sum(1)  # (C1, M)
        denom = nk.clamp_min(_TINY)
        mu_new = resp.transpose(1, 2) @ X / denom[..., None]  # (C1, M, D)
        if self.covariance == "diag":
            ex2 = resp.transpose(1, 2) @ (X * X) / denom[..., None]
            cov_new = (ex2 - mu_new * mu_new).clamp_min(self.eps)
        else:
            weighted = resp.transpose(1, 2)[..., None] * X[:, None]  # (C1, M, S, D)
            exx = weighted.transpose(-1, -2) @ X[:, None] / denom[..., None, None]  # (C1, M, D, D)
            cov_new = exx - mu_new[..., :, None] * mu_new[..., None, :]
            eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
            cov_new = 0.5 * (cov_new + cov_new.transpose(-1, -2)) + self.eps * eye
        alive = nk >= _DEAD  # a component nobody is responsible for keeps its previous Gaussian
        mu_new = torch.where(alive[..., None], mu_new, mu)
        cov_new = torch.where(alive.view(*alive.shape, *([1] * (cov.dim() - 2))), cov_new, cov)
        w_new = (nk / n.clamp_min(1).to(X.dtype)[:, None]).clamp_min(_MIN_WEIGHT)
        w_new = w_new / w_new.sum(-1, keepdim=True)
        return w_new, mu_new, cov_new

    @torch.no_grad()
    @record_function("gmm.em")
    def update(self, iteration: int = 0) -> bool:
        """Run EM on the banks now (vectorised over classes and components); returns whether it did.

        Classes with fewer than max(M, 2) stored (and, with ``max_age``, fresh) samples keep their parameters. A class estimated
        for the first time is seeded by k-means++ on its bank and takes the EM estimate as is;
        afterwards EM starts from the current parameters and the estimate is blended with
        ``momentum`` (means, covariance matrices and weights; weights renormalised).
        """
        valid = self.bank_valid_mask(iteration)
        n = valid.sum(1)
        eligible = n >= max(self.num_components, 2)
        if not bool(eligible.any()):
            return False
        X = self.bank.double()
        w_old, mu_old, cov_old = self.weights.double(), self.means.double(), self.covariances.double()
        w, mu, cov = w_old, mu_old, cov_old
        fresh = eligible & ~self.initialized
        if bool(fresh.any()):
            w0, mu0, cov0 = self._init_from_bank(X, valid, n, iteration)
            w, mu, cov = _where(fresh, w0, w), _where(fresh, mu0, mu), _where(fresh, cov0, cov)
        for _ in range(self.em_iters):
            w_new, mu_new, cov_new = self._em_iteration(X, valid, n, w, mu, cov)
            w, mu, cov = _where(eligible, w_new, w), _where(eligible, mu_new, mu), _where(eligible, cov_new, cov)
        blend = eligible & self.initialized
        m = self.momentum
        w_b = m * w_old + (1.0 - m) * w
        w = _where(blend, w_b / w_b.sum(-1, keepdim=True), w)
        mu = _where(blend, m * mu_old + (1.0 - m) * mu, mu)
        cov = _where(blend, m * cov_old + (1.0 - m) * cov, cov)
        self.weights.copy_(w)
        self.means.copy_(mu)
        self.covariances.copy_(cov)
        self.initialized |= eligible
        if comm.get_world_size() > 1:
            # Same bank + same draws give the same result everywhere; broadcasting rank 0's copy
            # also removes any last-bit differences between devices' reductions.
            for buf in (self.weights, self.means, self.covariances):
                dist.broadcast(buf, src=0)
        self._diag_cache = None  # collectives need not bump version counters: drop derived terms explicitly
        return True

    @torch.no_grad()
    def step(self, iteration: int) -> None:
        """Call once per training iteration after ``observe``: EM every ``update_interval`` iterations."""
        if (int(iteration) + 1) % self.update_interval == 0:
            self.update(iteration)

    # ------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    @record_function("gmm.sample")
    def sample(self, labels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw one class-conditional prompt per label: labels (K,) -> (K, D) on the buffers' device.

        The component is drawn from pi_c, then z = mu + L eps (diag: sqrt(var) * eps). Random numbers
        come from ``generator`` (on its device) when given, else from the default generator.
        """
        self._check_labels(labels, "sample")
        dev = self.means.device
        K = labels.numel()
        if K == 0:
            return self.means.new_zeros(0, self.embed_dim)
        draw_dev = generator.device if generator is not None else dev
        lab = labels.to(dev).long()
        comp = torch.multinomial(self.weights[lab].to(draw_dev), 1, generator=generator).squeeze(1).to(dev)
        noise = torch.randn(K, self.embed_dim, generator=generator, device=draw_dev).to(dev)
        mu = self.means[lab, comp]
        if self.covariance == "diag":
            return mu + self.covariances[lab, comp].sqrt() * noise
        L, _, _ = self._full_factors()
        return mu + (L[lab, comp].to(noise.dtype) @ noise[..., None]).squeeze(-1)
