"""Per-class Gaussian mixtures fitted by EM to memory banks of embeddings (CCDM's generative model).

:class:`ClassMixtures` holds, for each of K mixtures (one per class), M Gaussians over D-dim
embeddings (paper §3.2, eqs. 2-4) and a ring-buffer memory bank of the embeddings observed for that
class. ``update`` fits the mixtures to the banks by EM and blends the estimate into the current
parameters with momentum; ``sample`` draws from them. Nothing is learned by gradient: every piece
of state is a buffer, so it is checkpointed and, by construction, identical on every rank (banks are
gathered across ranks, EM draws come from a generator seeded identically everywhere).

What keeps the M components of a mixture alive (each can be switched off):

* a class is first fitted only once its bank holds ``min_entries`` *distinct* entries (entries
  observed from the same query, e.g. by several decoder layers, count once); before that it keeps
  its prior parameters and ``fitted`` is False for it (callers do not sample from it);
* the first fit is seeded by k-means++; afterwards EM starts from the current parameters;
* a component whose mixing weight falls below ``reseed_below / M`` is re-seeded before each EM
  iteration, by default by splitting its class's heaviest component in two along its principal
  axis (or on the bank entry the class's mixture explains worst), and is taken as estimated, not
  blended with momentum;
* ``eps_class_relative`` > 0 raises each class's variance floor only to that fraction of the class's
  own spread, so a class whose embeddings are tighter than ``eps`` is not fitted by coinciding
  components (whose weights the likelihood then no longer constrains);
* ``estep="sinkhorn"`` balances the responsibilities so that every component takes an equal share
  of the bank (GMMSeg's guard against collapse; the weights then stay uniform).

With ``mean_prior_weight`` kappa > 0 the M-step's means are MAP estimates under a Gaussian prior
centred on the random prior means (one per component, nearly orthogonal between classes in high D):
mu_km = (sum_s r_skm x_s + kappa_t mu0_km) / (N_km + kappa_t), kappa_t = kappa the prior's weight in
bank entries, decaying linearly to 0 over ``mean_prior_iters`` iterations (0: constant). While the
embeddings of different classes still lie together, the class means that score them then stay
apart; the variances are estimated around the data's own weighted mean (the prior moves means only).

``normalize=True`` models L2-normalised embeddings (unit vectors, as GMMSeg): the bank stores unit
vectors, the M-step projects each mean back onto the unit sphere, ``eps`` floors the variances on
that scale (a unit vector's coordinates have variance about 1/D), and ``sample`` rescales its unit
samples by the mean norm of the class's raw embeddings so that prompts live where the queries do.

Shapes: K mixtures, M components, D dims, S bank slots per class. Buffers: weights (K, M), means
(K, M, D), covariances (K, M, D) ("diag", "tied") or (K, M, D, D) ("full"), initialized (K,) bool,
bank (K, S, D), bank_count / bank_ptr (K,), bank_iter (K, S) (the training iteration of each entry),
bank_source (K, S) (which query of that iteration it came from), bank_norm (K,) (mean raw norm of
the entries, for ``normalize``).

Numerics: log-densities and EM run in float64; autocast is disabled. Full covariances need a
(N, K, M, D) intermediate and are meant for small D or few classes.
"""
import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.profiler import record_function

from detectron2.utils import comm

__all__ = ["ClassMixtures", "LIVE_WEIGHT"]

_LOG_2PI = math.log(2.0 * math.pi)
_TINY = 1e-12  # guards divisions by an (almost) empty responsibility mass
_MIN_WEIGHT = 1e-6  # mixing weights are floored here so log(pi) stays finite
_DEAD = 1e-6  # without re-seeding, a component with less responsibility mass keeps its Gaussian
LIVE_WEIGHT = 0.05  # a component counts as live (``live_components``) when its weight is at least this
_SOURCE_STRIDE = 1 << 24  # bank_source = rank * stride + the query's index within its rank's batch
# sources from here on (within a rank's stride) are CPM prompts' embeddings (GMM.OBSERVE_PROMPTS)
PROMPT_SOURCE = _SOURCE_STRIDE // 2
ESTEPS = ("posterior", "sinkhorn")
COVARIANCES = ("diag", "tied", "full")
RESEEDS = ("split", "worst")
_POWER_ITERS = 10  # power iterations for the principal axis of a component split in two
_SINKHORN_ITERS = 20  # alternating column / row normalisations of the balanced E-step


def _class_sums(labels: torch.Tensor, values: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes,) sums of ``values`` (N,) per label (N,) in [0, num_classes): ``bincount``
    without its host read of the largest label."""
    return torch.zeros(num_classes, dtype=values.dtype, device=values.device).scatter_add_(0, labels, values)


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.where with ``mask`` (K,) or (K, M) broadcast over the trailing dims of ``a``/``b``."""
    return torch.where(mask.view(*mask.shape, *([1] * (a.dim() - mask.dim()))), a, b)


class ClassMixtures(nn.Module):
    """K Gaussian mixtures of M components over D dims, each fitted to its own memory bank.

    observe(embeddings (N, D), labels (N,) in [0, K), iteration, sources (N,) or None): bank them.
    update(iteration) -> bool: EM on the banks now.  step(iteration): EM every ``update_interval``.
    component_log_prob(x (N, D), var_floor, mean_offset) -> (N, K, M): log pi_km + log N(x; mu_km,
    Sigma_km), the diagonal variances raised to at least var_floor (0: as fitted), the means shifted
    by mean_offset (K, M, D) where given.
    log_prob(x (..., D)) -> (..., K): log p(x | k) (logsumexp over components, eq. 2).
    sample(labels (N,)) -> (N, D).  fitted (K,) bool.  live_components() -> (K,) int.
    """

    def __init__(
        self,
        *,
        num_mixtures: int,
        embed_dim: int,
        num_components: int = 3,
        covariance: str = "diag",
        memory_size: int = 512,
        update_interval: int = 10,
        em_iters: int = 3,
        momentum: float = 0.5,
        eps: float = 1e-4,
        eps_class_relative: float = 0.0,
        prompt_eps: float = 0.0,
        prompt_scale: float = 1.0,
        min_entries: int = 2,
        reseed_below: float = 0.0,
        reseed: str = "split",
        estep: str = "posterior",
        normalize: bool = False,
        max_age: int = 0,
        mean_prior_weight: float = 0.0,
        mean_prior_iters: int = 0,
        init_std: float = 1.0,
        seed: int = 0,
    ):
        """
        Args:
            num_mixtures: K, one mixture (and bank) per class.
            embed_dim: D.
            num_components: M Gaussians per mixture.
            covariance: "diag" (one diagonal covariance per component), "tied" (one diagonal
                covariance per class, shared by its components: the pooled within-component spread)
                or "full".
            memory_size: S, entries kept per class (ring buffer, newest kept).
            update_interval: ``step(it)`` runs EM when ``(it + 1) % update_interval == 0``.
            em_iters: EM iterations per update.
            momentum: theta <- momentum * theta_old + (1 - momentum) * theta_EM (not applied to a
                class's first fit nor to re-seeded components).
            eps: variance floor (diag: var >= eps; full: Sigma + eps * I), on the modelled scale.
            eps_class_relative: r > 0: each class's floor in EM is max(eps, r * v_k), v_k the variance of
                its bank entries per coordinate (mean over the D coordinates), so that a class whose
                embeddings are tighter than eps can still be fitted by distinct components; 0 = eps for
                every class. Scores and prompt draws use the fitted covariances (and their own floors).
            prompt_eps: variance floor of the Gaussians ``sample`` draws from (diag / tied: each
                variance raised to at least this); 0 = the fitted covariances. Scores and EM ignore it.
            prompt_scale: s, the draws' spread around their component's mean: z = mu + s * L eps
                (1 = draws from the Gaussian itself; 0 = the component's mean). Scores and EM ignore it.
            min_entries: distinct bank entries a class needs before its first fit (>= 2).
            reseed_below: re-seed, before each EM iteration, components whose weight is below
                ``reseed_below / M`` (a fraction of the uniform weight); 0 = never (a component without
                responsibility mass then keeps its old Gaussian).
            reseed: how: "split" (halve the class's heaviest component along its principal axis) or
                "worst" (on the entry the class's mixture explains worst, class-wide covariance).
            estep: "posterior" (EM's responsibilities, eq. 3) or "sinkhorn" (balanced to equal
                component mass).
            normalize: model L2-normalised embeddings (means on the unit sphere).
            max_age: > 0: EM uses only entries stored at most this many iterations ago.
            mean_prior_weight: kappa >= 0, the weight in bank entries of the prior on each
                component's mean (centred on its prior mean; module docstring); 0 = plain EM.
            mean_prior_iters: > 0: kappa decays linearly from ``mean_prior_weight`` at iteration 0 to
                0 at this iteration; 0 = constant.
            init_std: std of the random prior means (unit prior variances; unit-norm with ``normalize``).
            seed: seeds the prior means and every EM draw (the same on every rank).
        """
        super().__init__()
        for name, value in (("num_mixtures", num_mixtures), ("embed_dim", embed_dim),
                            ("num_components", num_components), ("memory_size", memory_size),
                            ("update_interval", update_interval), ("em_iters", em_iters)):
            if int(value) != value or value < 1:
                raise ValueError(f"GMM {name} must be a positive integer, got {value!r}")
        if covariance not in COVARIANCES:
            raise ValueError(f"GMM covariance must be one of {COVARIANCES}, got {covariance!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"GMM momentum must be in [0, 1), got {momentum}")
        if eps <= 0:
            raise ValueError(f"GMM eps (variance floor) must be > 0, got {eps}")
        if eps_class_relative < 0:
            raise ValueError(f"GMM eps_class_relative (MODEL.MASK_FORMER.GMM.EPS_CLASS_RELATIVE) must be >= 0, "
                             f"got {eps_class_relative}")
        if prompt_eps < 0:
            raise ValueError(f"GMM prompt_eps (the prompts' variance floor) must be >= 0, got {prompt_eps}")
        if prompt_scale < 0:
            raise ValueError(f"GMM prompt_scale (MODEL.MASK_FORMER.GMM.PROMPT_SCALE) must be >= 0, got {prompt_scale}")
        if prompt_eps > 0 and covariance == "full":
            raise ValueError("GMM prompt_eps (MODEL.MASK_FORMER.GMM.PROMPT_EPS) applies to diagonal covariances: "
                             "set it to 0 with COVARIANCE 'full', or use 'diag' / 'tied'")
        if int(min_entries) != min_entries or min_entries < 2:
            raise ValueError(f"GMM min_entries (distinct entries before a class is fitted) must be an integer >= 2, "
                             f"got {min_entries!r}")
        if not 0.0 <= reseed_below < 1.0:
            raise ValueError(f"GMM reseed_below (a fraction of the uniform weight 1/M) must be in [0, 1), "
                             f"got {reseed_below}")
        if reseed not in RESEEDS:
            raise ValueError(f"GMM reseed must be one of {RESEEDS}, got {reseed!r}")
        if estep not in ESTEPS:
            raise ValueError(f"GMM estep must be one of {ESTEPS}, got {estep!r}")
        if int(max_age) != max_age or max_age < 0:
            raise ValueError(f"GMM max_age must be an integer >= 0, got {max_age!r}")
        if mean_prior_weight < 0:
            raise ValueError(f"GMM mean_prior_weight (MODEL.MASK_FORMER.GMM.MEAN_PRIOR_WEIGHT) must be >= 0, "
                             f"got {mean_prior_weight}")
        if int(mean_prior_iters) != mean_prior_iters or mean_prior_iters < 0:
            raise ValueError(f"GMM mean_prior_iters (MODEL.MASK_FORMER.GMM.MEAN_PRIOR_ITERS) must be an integer "
                             f">= 0, got {mean_prior_iters!r}")
        self.num_mixtures = int(num_mixtures)
        self.embed_dim = int(embed_dim)
        self.num_components = int(num_components)
        self.covariance = covariance
        self.memory_size = int(memory_size)
        self.update_interval = int(update_interval)
        self.em_iters = int(em_iters)
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.eps_class_relative = float(eps_class_relative)
        self.prompt_eps = float(prompt_eps)
        self.prompt_scale = float(prompt_scale)
        self.min_entries = int(min_entries)
        self.reseed_below = float(reseed_below)
        self.reseed = reseed
        self.estep = estep
        self.normalize = bool(normalize)
        self.max_age = int(max_age)
        self.mean_prior_weight = float(mean_prior_weight)
        self.mean_prior_iters = int(mean_prior_iters)
        self.seed = int(seed)

        K, M, D, S = self.num_mixtures, self.num_components, self.embed_dim, self.memory_size
        gen = torch.Generator().manual_seed(self.seed)
        means = torch.randn(K, M, D, generator=gen) * float(init_std)
        if self.normalize:
            means = F.normalize(means, dim=-1)
        self.register_buffer("weights", torch.full((K, M), 1.0 / M))
        self.register_buffer("means", means)
        # the centres of the means' prior: regenerated from the seed, so not in checkpoints
        self.register_buffer("prior_means", means.clone(), persistent=False)
        prior_var = 1.0 / D if self.normalize else 1.0
        if covariance != "full":
            self.register_buffer("covariances", torch.full((K, M, D), prior_var))
        else:
            self.register_buffer("covariances", (prior_var * torch.eye(D)).expand(K, M, D, D).clone())
        self.register_buffer("initialized", torch.zeros(K, dtype=torch.bool))
        self.register_buffer("bank", torch.zeros(K, S, D))
        self.register_buffer("bank_count", torch.zeros(K, dtype=torch.long))
        self.register_buffer("bank_ptr", torch.zeros(K, dtype=torch.long))
        self.register_buffer("bank_iter", torch.zeros(K, S, dtype=torch.long))
        self.register_buffer("bank_source", torch.arange(S).repeat(K, 1))
        self.register_buffer("bank_norm", torch.ones(K))
        self._factor_cache = None  # full covariance: (key, L, L^-1, log|Sigma|)
        self._diag_cache = None  # diagonal: (key, 1/var, mu/var, sum mu^2/var, log-normaliser + log pi)

    def extra_repr(self) -> str:
        return (f"num_mixtures={self.num_mixtures}, embed_dim={self.embed_dim}, num_components={self.num_components}, "
                f"covariance={self.covariance}, memory_size={self.memory_size}, update_interval={self.update_interval}, "
                f"em_iters={self.em_iters}, momentum={self.momentum}, eps={self.eps}, "
                f"eps_class_relative={self.eps_class_relative}, prompt_eps={self.prompt_eps}, "
                f"prompt_scale={self.prompt_scale}, "
                f"min_entries={self.min_entries}, "
                f"reseed_below={self.reseed_below}, reseed={self.reseed}, estep={self.estep}, normalize={self.normalize}, "
                f"max_age={self.max_age}, mean_prior_weight={self.mean_prior_weight}, "
                f"mean_prior_iters={self.mean_prior_iters}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # banks saved before entries were stamped: ages unknown (0), every entry its own source,
        # raw norms unknown (1: only used with ``normalize``)
        if prefix + "bank" in state_dict:
            defaults = {"bank_iter": torch.zeros_like(self.bank_iter), "bank_source": torch.arange(
                self.memory_size).repeat(self.num_mixtures, 1), "bank_norm": torch.ones_like(self.bank_norm)}
            for name, value in defaults.items():
                state_dict.setdefault(prefix + name, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------------ checks
    def check_labels(self, labels: torch.Tensor, what: str) -> None:
        if labels.dim() != 1:
            raise ValueError(f"GMM {what}: labels must be 1-D, got shape {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_mixtures):
            raise ValueError(f"GMM {what}: labels must lie in [0, {self.num_mixtures - 1}], got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")

    def _check_embeddings(self, x: torch.Tensor, what: str) -> None:
        if x.dim() < 1 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"GMM {what} must have shape (..., {self.embed_dim}), got {tuple(x.shape)}")

    # ------------------------------------------------------------------------------ densities
    def _full_factors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cholesky factor L, its inverse and log|Sigma| of every component (float64), cached under
        the covariance buffer's storage, device and version counter."""
        cov = self.covariances
        key = (cov.data_ptr(), cov.device, cov._version)
        if self._factor_cache is None or self._factor_cache[0] != key:
            L, info = torch.linalg.cholesky_ex(cov.double())
            if bool((info != 0).any()):
                raise RuntimeError("a full GMM covariance is not positive definite (corrupt checkpoint, or "
                                   "eps too small)")
            eye = torch.eye(self.embed_dim, dtype=L.dtype, device=L.device).expand_as(L)
            L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
            logdet = 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            self._factor_cache = (key, L, L_inv, logdet)
        return self._factor_cache[1:]

    def _diag_terms(self, var_floor: float = 0.0):
        """Float64 terms of the diagonal log-density over the K x M = KM components, variances
        raised to at least ``var_floor``: 1/var (D, KM), mu/var (D, KM), sum_d mu^2/var (KM,),
        -0.5 (D log 2pi + log|Sigma|) + log pi (KM,); cached under the buffers' storage, device and
        version counters and the floor."""
        bufs = (self.weights, self.means, self.covariances)
        key = tuple((t.data_ptr(), t.device, t._version) for t in bufs) + (float(var_floor),)
        if self._diag_cache is None or self._diag_cache[0] != key:
            KM, D = self.num_mixtures * self.num_components, self.embed_dim
            var = self.covariances.double().reshape(KM, D).clamp_min(float(var_floor))
            mu = self.means.double().reshape(KM, D)
            inv = var.reciprocal()
            log_w = self.weights.double().clamp_min(_TINY).log().reshape(KM)
            const = -0.5 * (D * _LOG_2PI + var.log().sum(-1)) + log_w
            self._diag_cache = (key, inv.t().contiguous(), (mu * inv).t().contiguous(), (mu * mu * inv).sum(-1), const)
        return self._diag_cache[1:]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (..., D) in the modelled space: L2-normalised with ``normalize``, else as they are."""
        return F.normalize(x, dim=-1) if self.normalize else x

    def component_log_prob(self, x: torch.Tensor, var_floor: float = 0.0,
                           mean_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (N, D) -> log pi_km + log N(prepare(x); mu_km + offset_km, Sigma_km): (N, K, M) float64.
        With ``var_floor`` > 0 each diagonal variance is raised to at least it (diag / tied only);
        ``mean_offset`` (K, M, D) or None (no shift) is added to the means here only (with its
        gradient), not where EM fits them nor where ``sample`` draws."""
        K, M, D = self.num_mixtures, self.num_components, self.embed_dim
        if var_floor > 0 and self.covariance == "full":
            raise ValueError("a scoring variance floor applies to diagonal covariances, not 'full'")
        if mean_offset is not None and tuple(mean_offset.shape) != (K, M, D):
            raise ValueError(f"mean_offset must be (K, M, D) = {(K, M, D)}, got {tuple(mean_offset.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.prepare(x.double() if x.dtype != torch.float64 else x)
            if self.covariance != "full":
                inv_t, mu_inv_t, mu2_inv, const = self._diag_terms(var_floor)
                if mean_offset is not None:
                    mu = self.means.double().reshape(K * M, D) + mean_offset.double().reshape(K * M, D)
                    mu_inv_t = mu.t() * inv_t
                    mu2_inv = (mu * mu * inv_t.t()).sum(-1)
                # sum((x - mu)^2 / var) = x^2 . (1/var) - 2 x . (mu/var) + mu^2 . (1/var): two fused matmuls
                quad = torch.addmm(torch.addmm(mu2_inv, x, mu_inv_t, alpha=-2.0), x * x, inv_t).clamp_min(0.0)
                return (const - 0.5 * quad).reshape(-1, K, M)
            log_w = self.weights.double().clamp_min(_TINY).log()
            _, L_inv, logdet = self._full_factors()
            means = self.means.double() if mean_offset is None else self.means.double() + mean_offset.double()
            diff = x[:, None, None, :] - means  # (N, K, M, D)
            quad = torch.einsum("kmde,nkme->nkmd", L_inv, diff).pow(2).sum(-1)
            return -0.5 * (D * _LOG_2PI + logdet + quad) + log_w

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x | k) = logsumexp_m [log pi_km + log N] (eq. 2): (..., D) -> (..., K) float64."""
        self._check_embeddings(x, "embeddings")
        comp = self.component_log_prob(x.reshape(-1, self.embed_dim))
        return torch.logsumexp(comp, dim=-1).reshape(*x.shape[:-1], self.num_mixtures)

    # ------------------------------------------------------------------------------ memory bank
    @staticmethod
    def _all_gather_rows(*rows: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Concatenate per-rank tensors of N_r rows (variable N_r: padded to the max) in rank order."""
        world = comm.get_world_size()
        if world == 1:
            return rows
        size = torch.tensor([rows[0].shape[0]], dtype=torch.long, device=rows[0].device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        sizes = [int(s.item()) for s in sizes]
        n_max = max(sizes)
        if n_max == 0:
            return rows
        out = []
        for r in rows:
            pad = torch.zeros((n_max - r.shape[0], *r.shape[1:]), dtype=r.dtype, device=r.device)
            padded = torch.cat([r, pad]).contiguous()
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded)
            out.append(torch.cat([p[:n] for p, n in zip(parts, sizes)]))
        return tuple(out)

    @torch.no_grad()
    def _push(self, emb: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor, iteration: int) -> None:
        """Write (N, D) entries into the class ring buffers, newest last, without Python loops."""
        N = labels.numel()
        if N == 0:
            return
        K, S = self.num_mixtures, self.memory_size
        order = torch.argsort(labels, stable=True)  # group by class, keep arrival order inside
        lab, emb, sources = labels[order], emb[order], sources[order]
        counts = _class_sums(lab, torch.ones_like(lab), K)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(N, device=lab.device) - starts[lab]  # arrival index within its class
        # entries r and r + S of a class land in one slot and only the newest may stay: every entry
        # writes the newest entry of its slot, so repeated indices write one value (no host sync)
        owner = starts[lab] + rank + S * torch.div(counts[lab] - 1 - rank, S, rounding_mode="floor")
        slot = (self.bank_ptr[lab] + rank) % S
        self.bank.index_put_((lab, slot), emb[owner])
        self.bank_iter.index_put_((lab, slot), torch.full_like(lab, int(iteration)).to(self.bank_iter.dtype))
        self.bank_source.index_put_((lab, slot), sources[owner].to(self.bank_source.dtype))
        self.bank_ptr.copy_((self.bank_ptr + counts) % S)
        self.bank_count.copy_((self.bank_count + counts).clamp_max(S))

    @torch.no_grad()
    @record_function("gmm.observe")
    def observe(self, embeddings: torch.Tensor, labels: torch.Tensor, iteration: int = 0,
                sources: Optional[torch.Tensor] = None) -> None:
        """Bank detached embeddings (N, D) under labels (N,) in [0, K), stamped with ``iteration``.

        ``sources`` (N,) int: which query of this rank's batch each entry came from (entries with
        the same source in one iteration are copies of one query and count once towards
        ``min_entries``); None: every entry is its own source. A collective when torch.distributed
        is initialised: every rank calls it (N may be 0) and every rank banks the rows of all ranks.
        """
        if embeddings.dim() != 2 or embeddings.shape[-1] != self.embed_dim:
            raise ValueError(f"GMM observe expects embeddings (N, {self.embed_dim}), got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"GMM observe expects labels (N,) matching embeddings (N, D), got "
                             f"{tuple(labels.shape)} and {tuple(embeddings.shape)}")
        self.check_labels(labels, "observe")
        dev = self.bank.device
        emb = embeddings.detach().to(device=dev, dtype=self.bank.dtype)
        lab = labels.detach().to(device=dev, dtype=torch.long)
        src = (torch.arange(lab.numel(), device=dev) if sources is None
               else sources.detach().to(device=dev, dtype=torch.long))
        src = src + comm.get_rank() * _SOURCE_STRIDE
        norms = emb.norm(dim=-1)
        emb, lab, src, norms = self._all_gather_rows(emb, lab, src, norms)
        if self.normalize and lab.numel():
            # running mean of the raw norms per class (same momentum as the parameters)
            count = _class_sums(lab, torch.ones_like(lab), self.num_mixtures)
            mean = _class_sums(lab, norms.double(), self.num_mixtures) / count.clamp_min(1)
            first = self.bank_count == 0
            blend = torch.where(first, mean.to(self.bank_norm.dtype),
                                self.momentum * self.bank_norm + (1 - self.momentum) * mean.to(self.bank_norm.dtype))
            self.bank_norm.copy_(torch.where(count > 0, blend, self.bank_norm))
            emb = F.normalize(emb, dim=-1)
        self._push(emb, lab, src, iteration)

    def bank_valid_mask(self, iteration: Optional[int] = None) -> torch.Tensor:
        """(K, S) bool: slots holding an entry (slots fill from 0 before wrapping) and, with
        ``max_age`` > 0 and ``iteration`` given, stored at most ``max_age`` iterations ago."""
        slots = torch.arange(self.memory_size, device=self.bank.device)
        valid = slots[None, :] < self.bank_count[:, None]
        if self.max_age > 0 and iteration is not None:
            valid &= self.bank_iter >= int(iteration) - self.max_age
        return valid

    def distinct_entries(self, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(K,) number of distinct (iteration, source) pairs among the valid bank entries."""
        valid = self.bank_valid_mask() if valid is None else valid
        key = self.bank_iter * (2 * _SOURCE_STRIDE * max(comm.get_world_size(), 1)) + self.bank_source
        key = torch.where(valid, key, torch.full_like(key, -1)).sort(dim=1).values
        new = torch.ones_like(valid)
        new[:, 1:] = key[:, 1:] != key[:, :-1]
        return (new & (key >= 0)).sum(1)

    @torch.no_grad()
    def bank_age(self, iteration: int) -> torch.Tensor:
        """(K,) mean age in iterations of each class's entries (NaN for an empty bank)."""
        valid = self.bank_valid_mask()
        age = (int(iteration) - self.bank_iter).to(torch.float64) * valid
        return (age.sum(1) / valid.sum(1)).to(torch.float32)  # 0 / 0 = NaN where empty

    @property
    def fitted(self) -> torch.Tensor:
        """(K,) bool: mixtures estimated from their bank at least once (the others hold their prior)."""
        return self.initialized

    def live_components(self, threshold: float = LIVE_WEIGHT) -> torch.Tensor:
        """(K,) number of components with weight >= ``threshold`` (0 for a class never fitted)."""
        return torch.where(self.initialized, (self.weights >= threshold).sum(1), torch.zeros_like(self.bank_count))

    # ------------------------------------------------------------------------------ EM
    def _paired_log_normal(self, x: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """Class-paired log N: x (K, S, D), mu (K, M, D), cov (K, M, D[, D]) (float64) -> (K, S, M)."""
        D = x.shape[-1]
        if self.covariance != "full":
            inv = cov.reciprocal()
            quad = (x * x) @ inv.transpose(1, 2) - 2.0 * (x @ (mu * inv).transpose(1, 2))
            quad = (quad + (mu * mu * inv).sum(-1)[:, None, :]).clamp_min(0.0)
            logdet = cov.log().sum(-1)
        else:
            L = torch.linalg.cholesky(cov)
            eye = torch.eye(D, dtype=L.dtype, device=L.device).expand_as(L)
            L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
            diff = x[:, :, None, :] - mu[:, None, :, :]  # (K, S, M, D)
            quad = torch.einsum("kmde,ksme->ksmd", L_inv, diff).pow(2).sum(-1)
            logdet = 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return -0.5 * (D * _LOG_2PI + logdet[:, None, :] + quad)

    @staticmethod
    def _centred_bank(X: torch.Tensor, valid: torch.Tensor, n: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each class's bank entries minus the class's mean (K, S, D), zero on invalid entries, and
        the entry counts (K, 1) clamped to >= 1."""
        w = valid.to(X.dtype)[..., None]
        cnt = n.clamp_min(1).to(X.dtype)[:, None]
        mean = (w * X).sum(1) / cnt
        return (X - mean[:, None]) * w, cnt

    def _bank_variance(self, X: torch.Tensor, valid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """(K, D) variance of each class's valid bank entries per coordinate (0 for an empty bank)."""
        centred, cnt = self._centred_bank(X, valid, n)
        return centred.pow(2).sum(1) / cnt

    def _variance_floor(self, X: torch.Tensor, valid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """(K,) the variance floor of each class's EM: eps, or max(eps, eps_class_relative * the class's
        bank variance per coordinate)."""
        floor = torch.full((X.shape[0],), self.eps, dtype=X.dtype, device=X.device)
        if self.eps_class_relative > 0:
            floor = torch.maximum(floor, self.eps_class_relative * self._bank_variance(X, valid, n).mean(-1))
        return floor

    def _class_covariance(self, X: torch.Tensor, valid: torch.Tensor, n: torch.Tensor,
                          floor: torch.Tensor) -> torch.Tensor:
        """Per-class covariance of the bank (diag: (K, D); full: (K, D, D)), floored by ``floor`` (K,)."""
        if self.covariance != "full":
            return self._bank_variance(X, valid, n).clamp_min(floor[:, None])
        centred, cnt = self._centred_bank(X, valid, n)
        cov = centred.transpose(1, 2) @ centred / cnt[..., None]
        eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
        return 0.5 * (cov + cov.transpose(1, 2)) + floor[:, None, None] * eye

    def _kmeans_pp(self, X, valid, n, iteration, floor):
        """Greedy k-means++ seeding of M means per class from its bank (all classes at once): each
        new centre is the best of 2 + ln(M) d^2-weighted candidates, the one that lowers the sum of
        squared distances to the nearest centre most (as scikit-learn's k-means), which rarely puts
        two seeds in one mode. Draws come from a CPU generator seeded from (seed, iteration):
        identical on every rank. Returns weights (K, M), means (K, M, D) and the class-wide
        covariance for every component."""
        K, S, D = X.shape
        M = self.num_components
        trials = 2 + int(math.log(M))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(iteration))
        rows = torch.arange(K, device=X.device)
        vmask = valid.to(X.dtype)
        base = valid.cpu().double()
        base[base.sum(1) == 0] = 1.0  # classes without entries: dummy draw, result unused
        chosen = torch.multinomial(base, 1, generator=gen)
        centre = X[rows, chosen[:, 0].to(X.device)]
        d2 = (X - centre[:, None]).pow(2).sum(-1)
        for _ in range(1, M):
            wts = (d2 * vmask).cpu()
            fallback = base.clone()
            fallback.scatter_(1, chosen, 0.0)  # uniform over not-yet-chosen entries
            fallback[fallback.sum(1) == 0] = 1.0
            wts = torch.where(wts.sum(1, keepdim=True) > 0, wts, fallback)
            cand = torch.multinomial(wts, trials, replacement=True, generator=gen).to(X.device)  # (K, L)
            cand_d2 = (X[:, None] - X[rows[:, None], cand][:, :, None]).pow(2).sum(-1)  # (K, L, S)
            cand_d2 = torch.minimum(d2[:, None], cand_d2)
            best = (cand_d2 * vmask[:, None]).sum(-1).argmin(1)  # (K,)
            nxt = cand.gather(1, best[:, None])
            chosen = torch.cat([chosen, nxt.cpu()], dim=1)
            d2 = cand_d2[rows, best]
        means = self._project(X[rows[:, None], chosen.to(X.device)])
        cov = self._class_covariance(X, valid, n, floor)
        cov = cov[:, None].expand(K, M, *cov.shape[1:]).clone()
        return torch.full((K, M), 1.0 / M, dtype=X.dtype, device=X.device), means, cov

    def _project(self, mu: torch.Tensor) -> torch.Tensor:
        return F.normalize(mu, dim=-1) if self.normalize else mu

    def _reseed(self, X, valid, n, w, mu, cov, eligible, floor):
        """Re-seed the components of eligible classes whose weight is below ``reseed_below / M``
        (``reseed``: "split" or "worst"). Returns (w, mu, cov, reseeded (K, M) bool)."""
        dead = (w < self.reseed_below / self.num_components) & eligible[:, None]
        if not bool(dead.any()):
            return w, mu, cov, dead
        if self.reseed == "split":
            return (*self._split_heaviest(X, valid, w, mu, cov, dead), dead)
        return self._reseed_on_worst(X, valid, n, w, mu, cov, dead, floor)

    def _split_heaviest(self, X, valid, w, mu, cov, dead):
        """Each dead component takes half of its class's heaviest component: the two means move
        apart by one standard deviation along that component's principal axis (of its responsible
        entries), both keep its covariance and half its weight. Returns (w, mu, cov)."""
        K, M = w.shape
        rows = torch.arange(K, device=X.device)
        log_r = self._paired_log_normal(X, mu, cov) + w.clamp_min(_TINY).log()[:, None, :]
        resp = torch.softmax(log_r, dim=-1) * valid[..., None].to(X.dtype)  # (K, S, M)
        order = dead.cumsum(1) * dead  # 1..d for the dead components, 0 for the live
        alive = ~dead
        for j in range(1, M):
            target = order == j  # (K, M): the j-th dead component of each class
            has = target.any(1)
            if not bool(has.any()):
                break
            heavy = w.masked_fill(~alive, -1.0).argmax(1)  # (K,)
            r = resp[rows, :, heavy]  # (K, S)
            centred = (X - mu[rows, heavy][:, None]) * r.clamp_min(0).sqrt()[..., None]  # (K, S, D)
            v = torch.ones_like(X[:, 0]) / X.shape[-1] ** 0.5
            for _ in range(_POWER_ITERS):  # principal axis of the weighted scatter
                v = F.normalize((centred.transpose(1, 2) @ (centred @ v[..., None])).squeeze(-1), dim=-1)
            lam = (centred @ v[..., None]).squeeze(-1).pow(2).sum(1) / r.sum(1).clamp_min(_TINY)
            offset = lam.sqrt()[:, None] * v  # (K, D)
            centre = mu[rows, heavy]
            heavy_mask = F.one_hot(heavy, M).bool() & has[:, None]
            mu = _where(target, self._project(centre + offset)[:, None].expand_as(mu), mu)
            mu = _where(heavy_mask, self._project(centre - offset)[:, None].expand_as(mu), mu)
            cov = _where(target, cov[rows, heavy][:, None].expand_as(cov), cov)
            half = (w[rows, heavy] / 2.0)[:, None].expand_as(w)
            w = torch.where(target | heavy_mask, half, w)
            alive = alive | target
        return w / w.sum(-1, keepdim=True), mu, cov

    def _reseed_on_worst(self, X, valid, n, w, mu, cov, dead, floor):
        """Dead components are re-seeded on the entries the class's mixture explains worst (the j-th
        dead one on the j-th worst), with the class-wide covariance and, together, half of the
        heaviest component's weight. Returns (w, mu, cov, dead)."""
        K, M = w.shape
        log_r = self._paired_log_normal(X, mu, cov) + w.clamp_min(_TINY).log()[:, None, :]
        fit = torch.logsumexp(log_r, dim=-1).masked_fill(~valid, float("inf"))  # (K, S)
        worst = fit.topk(min(M, X.shape[1]), dim=1, largest=False).indices  # (K, <=M) worst first
        # the j-th dead component of a class takes its j-th worst entry (never past its valid ones)
        order = torch.minimum(dead.cumsum(1) - 1, (n - 1)[:, None]).clamp(0, worst.shape[1] - 1)
        entry = worst.gather(1, order)  # (K, M)
        seeded = X[torch.arange(K, device=X.device)[:, None], entry]  # (K, M, D)
        mu = _where(dead, self._project(seeded), mu)
        class_cov = self._class_covariance(X, valid, n, floor)
        cov = _where(dead, class_cov[:, None].expand_as(cov), cov)
        # the re-seeded components share half of the heaviest live component's weight
        heavy = w.masked_fill(dead, -1.0).argmax(1, keepdim=True)  # (K, 1)
        w_heavy = w.gather(1, heavy)
        n_dead = dead.sum(1, keepdim=True)
        w = w.scatter(1, heavy, torch.where(n_dead > 0, w_heavy / 2.0, w_heavy))
        w = torch.where(dead, w_heavy / 2.0 / n_dead.clamp_min(1), w)
        return w / w.sum(-1, keepdim=True), mu, cov, dead

    def _responsibilities(self, log_r: torch.Tensor, valid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """(K, S, M) responsibilities from log pi + log N, zero on invalid entries: the posterior, or
        with ``estep="sinkhorn"`` balanced so that each component holds n / M of the mass."""
        if self.estep == "posterior":
            return torch.softmax(log_r, dim=-1) * valid[..., None].to(log_r.dtype)
        M = log_r.shape[-1]
        neg = torch.finfo(log_r.dtype).min
        q = torch.where(valid[..., None], log_r, torch.full_like(log_r, neg))
        target_col = (n.clamp_min(1).to(log_r.dtype) / M).log()[:, None]  # (K, 1)
        for _ in range(_SINKHORN_ITERS):
            q = q - torch.logsumexp(q, dim=1, keepdim=True) + target_col[:, None, :]  # columns -> n / M
            q = q - torch.logsumexp(q, dim=2, keepdim=True)  # rows -> 1
            q = torch.where(valid[..., None], q, torch.full_like(q, neg))
        return q.exp() * valid[..., None].to(log_r.dtype)

    def mean_prior_weight_at(self, iteration: int) -> float:
        """kappa_t, the weight in bank entries of the prior on the means at ``iteration``."""
        if self.mean_prior_iters == 0:
            return self.mean_prior_weight
        return self.mean_prior_weight * max(0.0, 1.0 - int(iteration) / self.mean_prior_iters)

    def _em_iteration(self, X, valid, n, w, mu, cov, floor, kappa: float = 0.0):
        """One E-step (eq. 3) + M-step (eq. 4) for all classes and components at once (float64);
        ``floor`` (K,) is each class's variance floor, ``kappa`` the weight of the means' prior."""
        log_r = self._paired_log_normal(X, mu, cov) + w.clamp_min(_TINY).log()[:, None, :]
        resp = self._responsibilities(log_r, valid, n)
        nk = resp.sum(1)  # (K, M)
        denom = nk.clamp_min(_TINY)
        sums = resp.transpose(1, 2) @ X  # (K, M, D) responsibility-weighted sums of the entries
        ex = sums / denom[..., None]
        mu_new = self._project(ex)
        if self.covariance != "full":
            ex2 = resp.transpose(1, 2) @ (X * X) / denom[..., None]
            # E[(x - mu)^2] around the (possibly projected) mean
            cov_new = (ex2 - 2.0 * mu_new * ex + mu_new * mu_new).clamp_min(floor[:, None, None])
            if self.covariance == "tied":  # the pooled within-component variance, shared by the class
                pooled = (nk[..., None] * cov_new).sum(1) / nk.sum(1).clamp_min(_TINY)[:, None]
                cov_new = pooled[:, None].expand_as(cov_new).clamp_min(floor[:, None, None])
        else:
            centred = X[:, None] - mu_new[:, :, None]  # (K, M, S, D)
            weighted = resp.transpose(1, 2)[..., None] * centred
            cov_new = weighted.transpose(-1, -2) @ centred / denom[..., None, None]
            eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
            cov_new = 0.5 * (cov_new + cov_new.transpose(-1, -2)) + floor[:, None, None, None] * eye
        if kappa > 0:  # MAP means; the variances above stay around the data's own (ML) mean
            mu_new = self._project((sums + kappa * self.prior_means.to(X.dtype)) / (nk + kappa)[..., None])
        alive = nk >= _DEAD  # a component nobody is responsible for keeps its previous Gaussian
        mu_new = _where(alive, mu_new, mu)
        cov_new = _where(alive, cov_new, cov)
        w_new = (nk / n.clamp_min(1).to(X.dtype)[:, None]).clamp_min(_MIN_WEIGHT)
        return w_new / w_new.sum(-1, keepdim=True), mu_new, cov_new

    @torch.no_grad()
    @record_function("gmm.em")
    def update(self, iteration: int = 0) -> bool:
        """Run EM on the banks now (vectorised over classes and components); returns whether it did.

        Classes with fewer than ``min_entries`` distinct (and, with ``max_age``, fresh) entries keep
        their parameters. A class fitted for the first time is seeded by k-means++ and takes the EM
        estimate as is; afterwards EM starts from the current parameters (re-seeding starved
        components first) and the estimate is blended in with ``momentum``.
        """
        valid = self.bank_valid_mask(iteration)
        n = valid.sum(1)
        eligible = self.distinct_entries(valid) >= self.min_entries
        if not bool(eligible.any()):
            return False
        X = self.bank.double()
        floor = self._variance_floor(X, valid, n)
        kappa = self.mean_prior_weight_at(iteration)
        w_old, mu_old, cov_old = self.weights.double(), self.means.double(), self.covariances.double()
        w, mu, cov = w_old, mu_old, cov_old
        fresh = eligible & ~self.initialized
        if bool(fresh.any()):
            w0, mu0, cov0 = self._kmeans_pp(X, valid, n, iteration, floor)
            w, mu, cov = _where(fresh, w0, w), _where(fresh, mu0, mu), _where(fresh, cov0, cov)
        reseeded = torch.zeros_like(w, dtype=torch.bool)
        for _ in range(self.em_iters):
            if self.reseed_below > 0:
                w, mu, cov, dead = self._reseed(X, valid, n, w, mu, cov, eligible, floor)
                reseeded |= dead
            w_new, mu_new, cov_new = self._em_iteration(X, valid, n, w, mu, cov, floor, kappa)
            w, mu, cov = _where(eligible, w_new, w), _where(eligible, mu_new, mu), _where(eligible, cov_new, cov)
        m = self.momentum
        blend = (eligible & self.initialized)[:, None] & ~reseeded  # (K, M)
        w_b = torch.where(blend, m * w_old + (1.0 - m) * w, w)
        w = _where(eligible, w_b / w_b.sum(-1, keepdim=True), w)
        mu = _where(blend, self._project(m * mu_old + (1.0 - m) * mu), mu)
        cov = _where(blend, m * cov_old + (1.0 - m) * cov, cov)
        self.weights.copy_(w)
        self.means.copy_(mu)
        self.covariances.copy_(cov)
        self.initialized |= eligible
        if comm.get_world_size() > 1:
            # same banks + same draws give the same result everywhere; broadcasting rank 0's copy
            # also removes last-bit differences between devices' reductions
            for buf in (self.weights, self.means, self.covariances):
                dist.broadcast(buf, src=0)
        self._diag_cache = None  # collectives need not bump version counters: drop derived terms
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
        """One draw per label: labels (N,) -> (N, D) on the buffers' device. The component comes
        from pi_k, then z = mu + prompt_scale * L eps (diag: L = sqrt(max(var, prompt_eps))); with ``normalize``
        z is scaled by the class's mean raw norm. Random numbers come from ``generator`` (on its device) when given."""
        self.check_labels(labels, "sample")
        dev = self.means.device
        N = labels.numel()
        if N == 0:
            return self.means.new_zeros(0, self.embed_dim)
        draw_dev = generator.device if generator is not None else dev
        lab = labels.to(dev).long()
        comp = torch.multinomial(self.weights[lab].to(draw_dev), 1, generator=generator).squeeze(1).to(dev)
        noise = self.prompt_scale * torch.randn(N, self.embed_dim, generator=generator, device=draw_dev).to(dev)
        mu = self.means[lab, comp]
        if self.covariance != "full":
            z = mu + self.covariances[lab, comp].clamp_min(self.prompt_eps).sqrt() * noise
        else:
            L, _, _ = self._full_factors()
            z = mu + (L[lab, comp].to(noise.dtype) @ noise[..., None]).squeeze(-1)
        return z * self.bank_norm[lab, None] if self.normalize else z
