"""ClassMixtures (CCDM's per-class Gaussian mixtures): EM recovery, keeping the modes when fed as
training feeds them, re-seeding, the balanced E-step, the bank, sampling, state, DDP."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import cpm_d2  # noqa: F401  (compat fixes before detectron2)
from cpm_d2 import compat
from cpm_d2.config import get_cfg
from cpm_d2.modeling.class_predictor.gmm import mixture_options_from_config
from cpm_d2.modeling.class_predictor.mixture import LIVE_WEIGHT, ClassMixtures

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _gmm(num_classes=1, **kw):
    """num_classes + 1 mixtures (the predictor's C classes and no-object), plain EM by default."""
    args = dict(embed_dim=2, num_components=2, covariance="diag", memory_size=64,
                update_interval=1, em_iters=1, momentum=0.0, eps=1e-4)
    args.update(kw)
    return ClassMixtures(num_mixtures=num_classes + 1, **args)


def _log_likelihood(g, x, labels):
    return g.log_prob(x).gather(1, labels[:, None]).squeeze(1)


def _draw_mixture(rng, weights, means, covs, n):
    """n samples of sum_m w_m N(means[m], covs[m]); covs are full (M, D, D)."""
    comp = rng.choice(len(weights), size=n, p=weights)
    out = np.empty((n, means.shape[1]))
    for m in range(len(weights)):
        idx = comp == m
        out[idx] = rng.multivariate_normal(means[m], covs[m], size=int(idx.sum()))
    return out


def _match(est_means, true_means):
    """Index of the estimated component nearest to each true mean (must be a permutation)."""
    d = ((true_means[:, None, :] - est_means[None, :, :]) ** 2).sum(-1)
    perm = d.argmin(1)
    assert sorted(perm.tolist()) == list(range(len(true_means))), f"components not separated: {est_means}"
    return perm


# ----------------------------------------------------------------------------------- EM recovery
@pytest.mark.parametrize("cov_type,D", [("diag", 2), ("diag", 8), ("full", 2)])
def test_em_recovers_known_two_component_mixtures(cov_type, D):
    rng = np.random.default_rng(0)
    n = 3000
    truth = []
    for c in range(2):  # class 0 and the no-object class each get their own mixture
        w = np.array([0.3, 0.7]) if c == 0 else np.array([0.55, 0.45])
        mu = rng.uniform(-1, 1, size=(2, D))
        mu[0] -= 3.0 * (c + 1) / np.sqrt(D)
        mu[1] += 3.0 / np.sqrt(D)
        if cov_type == "diag":
            covs = np.stack([np.diag(rng.uniform(0.2, 1.0, size=D)) for _ in range(2)])
        else:
            covs = np.array([[[1.0, 0.6], [0.6, 1.0]], [[0.5, -0.2], [-0.2, 0.3]]]) * (1.0 if c == 0 else 0.5)
        truth.append((w, mu, covs))
    g = _gmm(num_classes=1, embed_dim=D, covariance=cov_type, memory_size=n, em_iters=150)
    for c, (w, mu, covs) in enumerate(truth):
        x = _draw_mixture(rng, w, mu, covs, n)
        g.observe(torch.from_numpy(x).float(), torch.full((n,), c))
    assert g.update(0)
    assert g.initialized.all()
    for c, (w, mu, covs) in enumerate(truth):
        est_mu = g.means[c].double().numpy()
        perm = _match(est_mu, mu)
        np.testing.assert_allclose(est_mu[perm], mu, atol=0.12)
        np.testing.assert_allclose(g.weights[c].double().numpy()[perm], w, atol=0.04)
        est_cov = g.covariances[c].double().numpy()[perm]
        if cov_type == "diag":
            np.testing.assert_allclose(est_cov, np.stack([np.diag(cv) for cv in covs]), rtol=0.15)
        else:
            np.testing.assert_allclose(est_cov, covs, atol=0.08)


@pytest.mark.parametrize("cov_type", ["diag", "full"])
def test_bank_log_likelihood_never_decreases_without_momentum(cov_type):
    rng = np.random.default_rng(1)
    D, n = 3, 400
    g = _gmm(num_classes=2, embed_dim=D, num_components=3, covariance=cov_type, memory_size=n, em_iters=1)
    labels = []
    for c in range(3):  # three overlapping blobs per class: EM needs many steps to converge
        mu = rng.normal(0, 1.0, size=(3, D))
        covs = np.stack([np.eye(D) * s for s in (0.3, 0.6, 1.0)])
        g.observe(torch.from_numpy(_draw_mixture(rng, np.ones(3) / 3, mu, covs, n)).float(), torch.full((n,), c))
        labels.append(torch.full((n,), c))
    bank = g.bank.reshape(-1, D)
    labels = torch.cat(labels)
    history = []
    for it in range(25):
        g.step(it)
        ll = _log_likelihood(g, bank.double(), labels).reshape(3, n).mean(1)  # per class
        history.append(ll.numpy())
    history = np.stack(history)
    diffs = np.diff(history, axis=0)
    assert (diffs >= -1e-6 * np.abs(history[1:])).all(), diffs.min()
    assert (history[-1] - history[0] > 1e-3).all()  # and EM actually improved something


def test_too_few_samples_keep_parameters_and_momentum_blends():
    D = 3
    g = _gmm(num_classes=2, embed_dim=D, num_components=2, memory_size=50, em_iters=3, momentum=0.0)
    rng = np.random.default_rng(2)
    g.observe(torch.from_numpy(rng.normal(size=(40, D))).float(), torch.zeros(40, dtype=torch.long))
    g.observe(torch.ones(1, D), torch.tensor([1]))  # class 1: one entry < min_entries (2)
    before = copy.deepcopy(g.state_dict())
    g.update(0)
    assert g.initialized.tolist() == [True, False, False]
    for key in ("weights", "means", "covariances"):
        assert torch.equal(g.state_dict()[key][1:], before[key][1:])
        assert not torch.equal(g.state_dict()[key][0], before[key][0])
    # second update with momentum: blend of the old parameters and the EM estimate from them
    g.observe(torch.from_numpy(rng.normal(1.0, 2.0, size=(30, D))).float(), torch.zeros(30, dtype=torch.long))
    old = copy.deepcopy(g.state_dict())
    em_only = copy.deepcopy(g)  # momentum 0 -> pure EM estimate from the same start
    g.momentum = 0.6
    g.update(1)
    em_only.update(1)
    np.testing.assert_allclose(g.means[0], 0.6 * old["means"][0] + 0.4 * em_only.means[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        g.covariances[0], 0.6 * old["covariances"][0] + 0.4 * em_only.covariances[0], rtol=1e-5, atol=1e-6
    )
    w = 0.6 * old["weights"][0] + 0.4 * em_only.weights[0]
    np.testing.assert_allclose(g.weights[0], w / w.sum(), rtol=1e-5)


# ----------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("cov_type", ["diag", "full"])
def test_sampling_statistics_match_parameters(cov_type):
    D, n = 3, 20000
    g = _gmm(num_classes=1, embed_dim=D, num_components=2, covariance=cov_type)
    mu = np.array([[[-6.0, 0.0, 1.0], [6.0, 2.0, -1.0]], [[0.0, 20.0, 0.0], [0.0, 30.0, 0.0]]])
    w = np.array([[0.25, 0.75], [0.5, 0.5]])
    if cov_type == "diag":
        cov = np.array([[[0.5, 1.0, 2.0], [1.5, 0.3, 0.8]]] * 2)
        cov_full = np.stack([[np.diag(v) for v in row] for row in cov])
    else:
        cov_full = np.array([[[[1.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 0.5]], np.diag([0.4, 0.9, 1.6])]] * 2)
        cov = cov_full
    g.weights.copy_(torch.from_numpy(w))
    g.means.copy_(torch.from_numpy(mu))
    g.covariances.copy_(torch.from_numpy(cov))
    labels = torch.zeros(n, dtype=torch.long)
    labels[::10] = 1  # a few of the other class, interleaved
    z = g.sample(labels, generator=torch.Generator().manual_seed(0)).double().numpy()
    assert z.shape == (n, D)
    other = z[labels.numpy() == 1]
    assert (other[:, 1] > 12).all()  # class-1 samples come from class 1's Gaussians
    z0 = z[labels.numpy() == 0]
    comp = ((z0[:, None, :] - mu[0][None]) ** 2).sum(-1).argmin(1)  # components are far apart
    freq = np.bincount(comp, minlength=2) / len(z0)
    np.testing.assert_allclose(freq, w[0], atol=0.015)
    for m in range(2):
        zm = z0[comp == m]
        np.testing.assert_allclose(zm.mean(0), mu[0, m], atol=0.06)
        np.testing.assert_allclose(np.cov(zm.T), cov_full[0, m], atol=0.08)


@pytest.mark.parametrize("cov_type", ["diag", "tied"])
def test_prompt_variance_floor_widens_draws_only(cov_type):
    """prompt_eps raises each variance to at least prompt_eps when sampling (variances above it are
    kept); the scores are those of the fitted covariances."""
    D, n = 2, 40000
    kw = dict(num_classes=0, embed_dim=D, num_components=1, covariance=cov_type)
    plain, wide = _gmm(**kw), _gmm(prompt_eps=0.25, **kw)
    for g in (plain, wide):
        g.means.copy_(torch.tensor([[[3.0, -1.0]]]))
        g.covariances.copy_(torch.tensor([[[0.01, 1.0]]]))  # one variance under the floor, one above
    x = torch.randn(7, D)
    torch.testing.assert_close(wide.log_prob(x), plain.log_prob(x))
    gen = torch.Generator().manual_seed(0)
    z = wide.sample(torch.zeros(n, dtype=torch.long), generator=gen).double()
    np.testing.assert_allclose(z.mean(0).numpy(), [3.0, -1.0], atol=0.02)
    np.testing.assert_allclose(z.var(0).numpy(), [0.25, 1.0], rtol=0.03)
    z0 = plain.sample(torch.zeros(n, dtype=torch.long), generator=torch.Generator().manual_seed(0)).double()
    np.testing.assert_allclose(z0.var(0).numpy(), [0.01, 1.0], rtol=0.03)


@pytest.mark.parametrize("cov_type", ["diag", "full"])
def test_prompt_scale_narrows_draws_around_the_component_mean(cov_type):
    """prompt_scale s draws z = mu + s L eps: variances s^2 times the fitted ones (s = 0.5 -> a
    quarter), s = 0 the component's mean itself; the scores are unchanged."""
    D, n = 2, 40000
    kw = dict(num_classes=0, embed_dim=D, num_components=1, covariance=cov_type)
    plain, half, point = _gmm(**kw), _gmm(prompt_scale=0.5, **kw), _gmm(prompt_scale=0.0, **kw)
    cov = torch.tensor([[[0.04, 1.0]]]) if cov_type == "diag" else torch.tensor([[[[0.04, 0.0], [0.0, 1.0]]]])
    for g in (plain, half, point):
        g.means.copy_(torch.tensor([[[3.0, -1.0]]]))
        g.covariances.copy_(cov)
    x = torch.randn(7, D)
    torch.testing.assert_close(half.log_prob(x), plain.log_prob(x))
    z = half.sample(torch.zeros(n, dtype=torch.long), generator=torch.Generator().manual_seed(0)).double()
    np.testing.assert_allclose(z.mean(0).numpy(), [3.0, -1.0], atol=0.02)
    np.testing.assert_allclose(z.var(0).numpy(), [0.01, 0.25], rtol=0.03)
    z = point.sample(torch.zeros(5, dtype=torch.long)).double()
    np.testing.assert_allclose(z.numpy(), np.tile([3.0, -1.0], (5, 1)), atol=1e-6)
    with pytest.raises(ValueError, match="PROMPT_SCALE.*>= 0"):
        _gmm(prompt_scale=-0.5)


def test_prompt_variance_floor_is_refused_with_full_covariances():
    with pytest.raises(ValueError, match="PROMPT_EPS.*'full'"):
        _gmm(covariance="full", prompt_eps=0.1)
    with pytest.raises(ValueError, match="prompt_eps.*>= 0"):
        _gmm(prompt_eps=-1.0)


@pytest.mark.parametrize("cov_type", ["diag", "full"])
def test_state_dict_round_trip(cov_type):
    rng = np.random.default_rng(5)
    a = _gmm(num_classes=2, embed_dim=3, num_components=2, covariance=cov_type, memory_size=40, em_iters=3)
    a.observe(torch.from_numpy(rng.normal(size=(90, 3))).float(), torch.arange(90) % 3)
    a.update(0)
    b = _gmm(num_classes=2, embed_dim=3, num_components=2, covariance=cov_type, memory_size=40, seed=7)
    x = torch.randn(6, 3)
    before = b.log_prob(x)  # fills b's factor cache for the old parameters
    b.load_state_dict(a.state_dict())
    assert not torch.equal(before, b.log_prob(x))
    assert torch.equal(a.log_prob(x), b.log_prob(x))
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    sa = a.sample(labels, generator=torch.Generator().manual_seed(11))
    sb = b.sample(labels, generator=torch.Generator().manual_seed(11))
    assert torch.equal(sa, sb)
    for key in ("bank", "bank_count", "bank_ptr", "initialized", "bank_source", "bank_iter"):
        assert torch.equal(getattr(a, key), getattr(b, key))


# ----------------------------------------------------------------------------------- memory bank
def test_ring_buffer_keeps_the_most_recent_per_class():
    S = 4
    g = _gmm(num_classes=2, embed_dim=1, memory_size=S)
    batches = [
        [0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 2, 1],  # 7 of class 0 in one batch (> S)
        [1, 1, 1],
        [],
        [2, 0],
    ]
    history = {0: [], 1: [], 2: []}
    next_id = 0
    for labels in batches:
        ids = list(range(next_id, next_id + len(labels)))
        next_id += len(labels)
        for i, c in zip(ids, labels):
            history[c].append(float(i))
        g.observe(torch.tensor(ids, dtype=torch.float32).reshape(-1, 1), torch.tensor(labels, dtype=torch.long))
        for c in range(3):
            recent = history[c][-S:]
            count, ptr = int(g.bank_count[c]), int(g.bank_ptr[c])
            assert count == len(recent)
            assert ptr == len(history[c]) % S
            vals = g.bank[c, :, 0].tolist()
            if count < S:
                assert vals[:count] == recent  # filled from slot 0, in arrival order
            else:
                assert [vals[(ptr + j) % S] for j in range(S)] == recent  # oldest sits at ptr
    assert g.bank_valid_mask().sum(1).tolist() == [S, S, 2]


def test_bank_age_and_max_age():
    """Entries carry the iteration they were stored at; bank_age is their mean age; with max_age,
    EM fits only the fresh ones (stale entries are ignored, not deleted)."""
    g = _gmm(memory_size=8, max_age=5)
    old = torch.tensor([[10.0, 10.0], [10.0, 11.0], [11.0, 10.0]])
    new = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    g.observe(old, torch.zeros(3, dtype=torch.long), iteration=0)
    g.observe(new, torch.zeros(4, dtype=torch.long), iteration=10)
    assert g.bank_iter[0, :7].tolist() == [0, 0, 0, 10, 10, 10, 10]
    # at iteration 12: ages 12 (x3) and 2 (x4) -> 44 / 7; class 1 (no object here) is empty -> NaN
    age = g.bank_age(12)
    assert age[0].item() == pytest.approx(44 / 7) and torch.isnan(age[1])
    assert g.bank_valid_mask(12)[0, :7].tolist() == [False] * 3 + [True] * 4
    assert g.bank_valid_mask()[0, :7].all()  # without an iteration: every stored entry
    assert g.update(12)
    # the fit sees only the 4 fresh points around (0.5, 0.5), never the stale ones near (10, 10)
    assert (g.means[0].abs() < 2).all()
    fresh_only = _gmm(memory_size=8, max_age=0)
    fresh_only.observe(old, torch.zeros(3, dtype=torch.long), iteration=0)
    fresh_only.observe(new, torch.zeros(4, dtype=torch.long), iteration=10)
    fresh_only.update(12)
    assert (fresh_only.means[0] > 4).any()  # max_age 0: the stale points pull a component away
    # a class whose every entry is stale keeps its parameters
    g2 = _gmm(memory_size=8, max_age=5)
    g2.observe(old, torch.zeros(3, dtype=torch.long), iteration=0)
    before = g2.means.clone()
    assert not g2.update(20) and torch.equal(g2.means, before)


def test_checkpoints_without_bank_stamps_still_load():
    g = _gmm()
    g.observe(torch.ones(3, 2), torch.zeros(3, dtype=torch.long), iteration=7, sources=torch.zeros(3))
    state = g.state_dict()
    for key in ("bank_iter", "bank_source", "bank_norm"):  # a checkpoint written before entries were stamped
        del state[key]
    other = _gmm()
    other.load_state_dict(state)
    assert torch.equal(other.bank, g.bank) and int(other.bank_iter.max()) == 0
    assert other.distinct_entries()[0] == 3  # unknown sources: every entry counts


def test_bad_input_raises_clear_errors():
    g = _gmm(num_classes=2, embed_dim=3)
    with pytest.raises(ValueError, match="labels must lie in"):
        g.observe(torch.zeros(2, 3), torch.tensor([0, 3 + 1]))
    with pytest.raises(ValueError, match="embeddings"):
        g.log_prob(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="covariance"):
        _gmm(covariance="spherical")
    with pytest.raises(ValueError, match="min_entries"):
        _gmm(min_entries=1)
    with pytest.raises(ValueError, match="reseed_below"):
        _gmm(reseed_below=1.0)
    with pytest.raises(ValueError, match="estep"):
        _gmm(estep="hard")
    with pytest.raises(ValueError, match="MEAN_PRIOR_WEIGHT"):
        _gmm(mean_prior_weight=-1.0)
    with pytest.raises(ValueError, match="MEAN_PRIOR_ITERS"):
        _gmm(mean_prior_iters=2.5)


# ----------------------------------------------------------------------------------- the means' prior
def _fit_one_class(iteration, **kw):
    """One component, 8 entries: 4 at (1, 0) and 4 at (3, 0) (mean (2, 0), variance (1, 0) -> floor),
    one EM iteration at ``iteration``; returns the mixtures."""
    g = _gmm(num_components=1, min_entries=2, **kw)
    x = torch.tensor([[1.0, 0.0]] * 4 + [[3.0, 0.0]] * 4)
    g.observe(x, torch.zeros(8, dtype=torch.long), iteration=iteration)
    assert g.update(iteration)
    return g


def test_mean_prior_gives_the_map_mean_and_leaves_the_variance():
    kappa = 24.0  # three times the 8 entries: the mean moves 3/4 of the way to the prior mean
    g = _fit_one_class(0, mean_prior_weight=kappa)
    mu0 = g.prior_means[0, 0]
    expected = (8 * torch.tensor([2.0, 0.0]) + kappa * mu0) / (8 + kappa)
    assert torch.allclose(g.means[0, 0], expected, atol=1e-6)
    # the variances are the data's around its own mean, as without the prior
    assert torch.allclose(g.covariances[0, 0], torch.tensor([1.0, 1e-4]), atol=1e-6)
    plain = _fit_one_class(0)
    assert torch.allclose(plain.means[0, 0], torch.tensor([2.0, 0.0]), atol=1e-6)
    assert torch.equal(plain.covariances, g.covariances)


def test_mean_prior_decays_linearly_to_plain_em():
    options = dict(mean_prior_weight=24.0, mean_prior_iters=100)
    g = _gmm(**options)
    assert [g.mean_prior_weight_at(i) for i in (0, 25, 100, 500)] == [24.0, 18.0, 0.0, 0.0]
    half = _fit_one_class(50, **options)  # kappa = 12: the mean moves 12/20 of the way
    expected = (8 * torch.tensor([2.0, 0.0]) + 12.0 * half.prior_means[0, 0]) / 20.0
    assert torch.allclose(half.means[0, 0], expected, atol=1e-6)
    late = _fit_one_class(100, **options)
    assert torch.allclose(late.means[0, 0], torch.tensor([2.0, 0.0]), atol=1e-6)


def test_mean_prior_keeps_unit_means_with_normalize_and_is_not_checkpointed():
    g = _fit_one_class(0, mean_prior_weight=8.0, normalize=True)
    assert torch.allclose(g.means.norm(dim=-1), torch.ones(2), atol=1e-6)
    # equal weights: the unit mean bisects the data's direction (1, 0) and the prior mean's
    mu0 = g.prior_means[0, 0]
    expected = torch.nn.functional.normalize(torch.tensor([1.0, 0.0]) + mu0, dim=0)
    assert torch.allclose(g.means[0, 0], expected, atol=1e-6)
    assert "prior_means" not in g.state_dict()



# ----------------------------------------------------------------------------------- keeping the modes
def _modes(rng, classes, m, d, spacing):
    """(classes, m, d) mode centres: per class, m points pairwise ``spacing`` apart around a random centre."""
    out = []
    for _ in range(classes):
        q, _ = np.linalg.qr(rng.normal(size=(d, m)))
        out.append(rng.normal(size=d) * 3 + q.T * spacing / np.sqrt(2))
    return np.stack(out)


def _feed_like_training(g, modes, iterations, layers, rng, noise=2.0):
    """What training does to the banks: each iteration 1-4 queries of random classes (a random mode
    each, within-mode noise of norm ~``noise``), each observed once per decoder layer (``layers``
    near copies sharing a source), then ``step``."""
    classes, m, d = modes.shape
    for it in range(iterations):
        k = int(rng.integers(1, 5))
        cls, comp = rng.integers(0, classes, size=k), rng.integers(0, m, size=k)
        x = modes[cls, comp] + rng.normal(size=(k, d)) * noise / np.sqrt(d)
        copies = np.concatenate([x + rng.normal(size=(k, d)) * 0.05 / np.sqrt(d) for _ in range(layers)])
        g.observe(torch.from_numpy(copies).float(), torch.from_numpy(np.tile(cls, layers)), it,
                  sources=torch.from_numpy(np.tile(np.arange(k), layers)))
        g.step(it)


def _in_model_space(g, modes):
    """The true modes where the mixture models them: on the unit sphere when ``g.normalize``."""
    if not g.normalize:
        return modes
    return modes / np.linalg.norm(modes, axis=-1, keepdims=True)


def _half_spacing(g, modes, c):
    """Half the smallest distance between two of class c's true modes, in the mixture's space."""
    m = _in_model_space(g, modes)[c]
    d = np.sqrt(((m[:, None] - m[None]) ** 2).sum(-1))
    return d[~np.eye(len(m), dtype=bool)].min() / 2


def _mode_errors(g, modes):
    """Per class: (live components, distance from each true mode to the nearest live mean, half the
    modes' spacing), distances in the mixture's space."""
    out = []
    target = _in_model_space(g, modes)
    for c in range(modes.shape[0]):
        live = g.weights[c] >= LIVE_WEIGHT
        mu = g.means[c][live].double().numpy()
        out.append((int(live.sum()), np.sqrt(((target[c][:, None] - mu[None]) ** 2).sum(-1)).min(1),
                    _half_spacing(g, modes, c)))
    return out


def _fit_fed_as_training(options, modes_per_class, spacing, dim, layers, seed, count_copies=False):
    """Three classes of ``modes_per_class`` modes ``spacing`` apart (``_modes``, drawn from ``seed``)
    and a mixture set built with ``options`` after 600 steps of ``_feed_like_training``. With
    ``count_copies`` copies of one query count as distinct entries (the old first-fit rule).
    Returns (mixtures, modes)."""
    rng = np.random.default_rng(seed)
    modes = _modes(rng, 3, modes_per_class, dim, spacing)
    g = ClassMixtures(num_mixtures=4, embed_dim=dim, seed=seed, **options)
    if count_copies:
        g.distinct_entries = lambda valid=None: valid.sum(1)
    _feed_like_training(g, modes, 600, layers, rng)
    return g, modes


def _classes_losing_modes(g, modes):
    """How many classes have fewer than three live components or a true mode farther than half the
    spacing from every live mean."""
    return sum(live < 3 or dist.max() >= half for live, dist, half in _mode_errors(g, modes))


def _config_options(name):
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / name))
    layers = cfg.MODEL.MASK_FORMER.DEC_LAYERS if cfg.MODEL.MASK_FORMER.GMM.OBSERVE_LAYERS == "all" else 1
    return mixture_options_from_config(cfg), layers, cfg.MODEL.MASK_FORMER.HIDDEN_DIM


@pytest.mark.parametrize("config", ["synthetic/cpm_r18_hard.yaml", "avss_r50.yaml"])
def test_three_separated_modes_fed_as_training_keep_three_live_components(config):
    """Three classes, each with three modes 8 variance-floor standard deviations (8 sqrt(EPS)) apart
    on the modelled scale (the floor bounds how close two modes a component can tell apart); fed as
    training feeds the banks (every query once per decoder layer, 1-4 queries a step) with the
    config's bank, EM schedule and momentum: every class ends with three live components, each true
    mode within half the spacing of a live mean. With the fit's guards off (first fit at M entries
    counted with copies, no re-seeding) the same feed loses modes."""
    options, layers, dim = _config_options(config)
    assert options["normalize"]  # the class centres of _modes have norm ~3 sqrt(D): spacing / that on the sphere
    spacing = 8.0 * options["eps"] ** 0.5 * 3.0 * dim ** 0.5
    for seed in range(3):
        g, modes = _fit_fed_as_training(options, options["num_components"], spacing, dim, layers, seed)
        for c, (live, dist, half) in enumerate(_mode_errors(g, modes)):
            assert live == 3, (seed, c, g.weights[c])
            assert dist.max() < half, (seed, c, dist, half)
    unguarded = dict(options, min_entries=options["num_components"], reseed_below=0.0)
    lost = sum(_classes_losing_modes(*_fit_fed_as_training(unguarded, options["num_components"], spacing, dim, layers,
                                                           seed, count_copies=True)) for seed in range(3))
    assert lost > 0


def test_class_relative_floor_keeps_modes_closer_than_the_floor():
    """Three classes whose three modes lie only 2 sqrt(EPS) apart on the unit sphere (a class tighter
    than the configs' floor, as the hard proxy's classes end training), fed as training feeds the
    banks with the hard config's schedule: at the configs' floor EPS the components of a class
    overlap and do not locate its modes (a mode farther than half the spacing from every live mean);
    with a floor of a quarter of each class's own variance
    (EPS_CLASS_RELATIVE 0.25, EPS 1e-4) every class keeps three live components, each true mode
    within half the spacing of a live mean."""
    options, layers, dim = _config_options("synthetic/cpm_r18_hard.yaml")
    spacing = 2.0 * options["eps"] ** 0.5 * 3.0 * dim ** 0.5
    results = {}
    for name, extra in (("absolute", {}), ("relative", {"eps": 1e-4, "eps_class_relative": 0.25})):
        results[name] = sum(_classes_losing_modes(*_fit_fed_as_training(
            dict(options, **extra), options["num_components"], spacing, dim, layers, seed)) for seed in range(3))
    assert results["relative"] == 0 and results["absolute"] > 0, results  # classes with a mode lost, of 9


def test_class_relative_floor_with_split_reseeding_tiles_a_one_mode_class():
    """A class with a single mode, tighter than the configs' floor, fed as training feeds it, with the
    class-relative floor: re-seeding on the worst-explained entries leaves the re-seeded components on
    stray entries, where they starve (fewer than three stay live), while splitting the heaviest component
    keeps all three live inside the class's data (each live mean nearer the mode than the class's
    own radius, sqrt of its total variance)."""
    options, layers, dim = _config_options("synthetic/cpm_r18_hard.yaml")
    relative = dict(options, eps=1e-4, eps_class_relative=0.25)
    live = {}
    for reseed in ("worst", "split"):
        live[reseed] = []
        for seed in range(3):
            g, modes = _fit_fed_as_training(dict(relative, reseed=reseed), 1, 1.0, dim, layers, seed)
            live[reseed] += g.live_components()[:3].tolist()
            if reseed == "split":
                centre = _in_model_space(g, modes)[:, 0]
                for c in range(3):
                    bank = g.bank[c, : int(g.bank_count[c])].double()
                    radius = bank.var(0).sum().sqrt().item()
                    dist = (g.means[c].double() - torch.from_numpy(centre[c])).norm(dim=-1)
                    assert (dist < radius).all(), (seed, c, dist, radius)
    assert live["split"] == [3] * 9, live
    assert max(live["worst"]) < 3, live


def test_class_relative_floor_follows_each_class_spread():
    """The EM floor of each class is max(eps, r * its bank variance per coordinate): a tight and a
    wide class fitted together get floors in the ratio of their spreads, and r = 0 gives eps."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(size=(100, 4)) * 0.1, rng.normal(size=(100, 4)) * 1.0])
    labels = np.repeat([0, 1], 100)
    g = _gmm(num_classes=1, embed_dim=4, num_components=2, memory_size=100, eps=1e-6, eps_class_relative=0.25)
    g.observe(torch.from_numpy(x).float(), torch.from_numpy(labels))
    valid = g.bank_valid_mask(0)
    floor = g._variance_floor(g.bank.double(), valid, valid.sum(1)).numpy()
    expected = [0.25 * x[labels == k].var(0).mean() for k in (0, 1)]
    np.testing.assert_allclose(floor, expected, rtol=1e-4)
    g.update(0)
    assert (g.covariances[0] >= 0.999 * expected[0]).all() and (g.covariances[1] >= 0.999 * expected[1]).all()
    absolute = _gmm(num_classes=1, embed_dim=4, eps=1e-3)
    absolute.observe(torch.from_numpy(x).float(), torch.from_numpy(labels))
    valid = absolute.bank_valid_mask(0)
    assert absolute._variance_floor(absolute.bank.double(), valid, valid.sum(1)).tolist() == [1e-3, 1e-3]
    with pytest.raises(ValueError, match="EPS_CLASS_RELATIVE"):
        _gmm(eps_class_relative=-0.1)

def test_one_shot_fit_on_plenty_of_data_recovers_every_mode():
    """One update on 500 entries per class (3 classes x 3 modes, D = 64), repeated over 6 seeds: every
    mode of every class has a live mean within half the mode spacing, and the weights are ~1/3."""
    options, _, _ = _config_options("synthetic/cpm_r18_hard.yaml")
    options.update(memory_size=500)
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        modes = _modes(rng, 3, 3, 64, 6.0)
        g = ClassMixtures(num_mixtures=4, embed_dim=64, seed=seed, **options)
        cls, comp = np.repeat(np.arange(3), 500), np.tile(np.arange(3), 500)
        x = modes[cls, comp] + rng.normal(size=(1500, 64)) * 2.0 / 8.0
        g.observe(torch.from_numpy(x).float(), torch.from_numpy(cls))
        assert g.update(0)
        for c, (live, dist, half) in enumerate(_mode_errors(g, modes)):
            assert live == 3 and dist.max() < half, (seed, c, g.weights[c], dist, half)
            np.testing.assert_allclose(g.weights[c].numpy(), 1 / 3, atol=0.05)


def test_a_killed_component_is_reseeded_on_the_mode_it_left():
    """A fitted class whose component is killed (weight ~0, mean far away) gets it back: the next
    update re-seeds it on the badly explained entries and it covers the uncovered mode again."""
    rng = np.random.default_rng(7)
    modes = _modes(rng, 1, 3, 16, 6.0)
    g = _gmm(num_classes=0, embed_dim=16, num_components=3, memory_size=300, em_iters=3, momentum=0.5,
             min_entries=12, reseed_below=0.4)
    comp = np.tile(np.arange(3), 100)
    x = modes[0, comp] + rng.normal(size=(300, 16)) * 0.25
    g.observe(torch.from_numpy(x).float(), torch.zeros(300, dtype=torch.long))
    g.update(0)
    assert _mode_errors(g, modes)[0][1].max() < 3.0
    victim = int(((g.means[0].double().numpy() - modes[0, 0]) ** 2).sum(-1).argmin())
    g.weights[0, victim] = 1e-6
    g.weights[0] /= g.weights[0].sum()
    g.means[0, victim] = 100.0
    assert _mode_errors(g, modes)[0][1][0] > 3.0  # mode 0 is uncovered now
    g.update(1)
    live, dist, _ = _mode_errors(g, modes)[0]
    assert live == 3 and dist.max() < 3.0, (g.weights[0], dist)
    # without re-seeding the dead component stays dead and mode 0 stays uncovered (or merged)
    g2 = copy.deepcopy(g)
    g2.reseed_below = 0.0
    g2.weights[0, victim] = 1e-6
    g2.weights[0] /= g2.weights[0].sum()
    g2.means[0, victim] = 100.0
    g2.update(2)
    assert g2.weights[0, victim] < LIVE_WEIGHT


def test_first_fit_waits_for_enough_distinct_entries():
    """Copies of one query (one source, several layers) count once: a class is neither fitted nor
    marked fitted before it holds ``min_entries`` distinct entries, and keeps its prior until then."""
    g = _gmm(num_classes=1, embed_dim=2, num_components=2, memory_size=64, min_entries=4)
    prior = g.means.clone()
    x = torch.randn(3, 2)
    g.observe(x.repeat(4, 1), torch.zeros(12, dtype=torch.long), 0, sources=torch.arange(3).repeat(4))
    assert g.distinct_entries()[0] == 3 and g.bank_count[0] == 12
    assert not g.update(0) and not g.fitted[0] and torch.equal(g.means, prior)
    g.observe(torch.randn(2, 2), torch.zeros(2, dtype=torch.long), 1, sources=torch.tensor([0, 0]))
    assert g.distinct_entries()[0] == 4  # same source index, another iteration: another query
    assert g.update(1) and g.fitted[0] and not torch.equal(g.means[0], prior[0])
    assert g.live_components().tolist() == [2, 0]  # the second mixture was never fitted


def test_sinkhorn_estep_balances_component_mass():
    """estep "sinkhorn": every entry's responsibilities sum to 1 and every component takes n / M of
    its class's bank; on three equal, separated modes the fit finds them with uniform weights."""
    g = _gmm(num_classes=1, embed_dim=2, num_components=3, estep="sinkhorn")
    log_r = torch.randn(2, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    valid = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7], dtype=torch.bool)
    r = g._responsibilities(log_r, valid, valid.sum(1))
    torch.testing.assert_close(r.sum(2), valid.double())
    torch.testing.assert_close(r.sum(1), (valid.sum(1, keepdim=True) / 3.0).double().expand(2, 3), atol=1e-3, rtol=0)
    rng = np.random.default_rng(3)
    modes = _modes(rng, 1, 3, 8, 6.0)
    h = _gmm(num_classes=0, embed_dim=8, num_components=3, memory_size=300, em_iters=10, estep="sinkhorn")
    x = modes[0, np.tile(np.arange(3), 100)] + rng.normal(size=(300, 8)) * 0.3
    h.observe(torch.from_numpy(x).float(), torch.zeros(300, dtype=torch.long))
    h.update(0)
    np.testing.assert_allclose(h.weights[0].numpy(), 1 / 3, atol=0.01)
    assert _mode_errors(h, modes)[0][1].max() < 1.0


def test_normalize_models_unit_vectors_and_samples_at_the_embeddings_scale():
    """normalize: the bank holds unit vectors, fitted means lie on the unit sphere, densities ignore
    the embeddings' norm, and prompts have the class's mean raw norm."""
    rng = np.random.default_rng(4)
    g = _gmm(num_classes=0, embed_dim=8, num_components=2, memory_size=200, em_iters=5, normalize=True, eps=1e-5)
    direction = np.stack([np.eye(8)[0], np.eye(8)[1]])
    unit = direction[np.tile([0, 1], 100)] + rng.normal(size=(200, 8)) * 0.05
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    scale = rng.uniform(4.0, 6.0, size=(200, 1))
    g.observe(torch.from_numpy(unit * scale).float(), torch.zeros(200, dtype=torch.long))
    torch.testing.assert_close(g.bank[0, :200].norm(dim=-1), torch.ones(200))
    g.update(0)
    torch.testing.assert_close(g.means[0].norm(dim=-1), torch.ones(2))
    assert (g.means[0] @ torch.from_numpy(direction).float().T).max(0).values.min() > 0.99
    x = torch.randn(5, 8)
    torch.testing.assert_close(g.log_prob(x), g.log_prob(3 * x))
    z = g.sample(torch.zeros(4000, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert z.norm(dim=-1).mean().item() == pytest.approx(float(scale.mean()), rel=0.03)


# ----------------------------------------------------------------------------------- distributed
_DIST_ARGS = dict(num_mixtures=3, embed_dim=3, num_components=2, memory_size=12, update_interval=2,
                  em_iters=2, momentum=0.5, min_entries=4, reseed_below=0.5)


def _rank_batch(rank, it):
    """Different data per rank and iteration; rank 1 sends nothing at iteration 2."""
    k = 0 if (rank == 1 and it == 2) else 5 + 3 * rank + it
    gen = torch.Generator().manual_seed(100 * rank + it)
    x = torch.randn(k, 3, generator=gen) + rank
    y = torch.randint(0, 3, (k,), generator=gen)
    return x, y


def _dist_worker(out_dir):
    import torch.distributed as dist

    rank = dist.get_rank()
    g = ClassMixtures(**_DIST_ARGS)
    for it in range(6):
        x, y = _rank_batch(rank, it)
        g.observe(x, y, it, sources=torch.arange(len(y)) // 2)  # pairs of copies of one query
        g.step(it)
    torch.save(g.state_dict(), Path(out_dir) / f"rank{rank}.pt")


def test_two_processes_hold_identical_state(tmp_path):
    compat.launch(_dist_worker, 2, dist_url="auto", args=(str(tmp_path),))
    s0 = torch.load(tmp_path / "rank0.pt")
    s1 = torch.load(tmp_path / "rank1.pt")
    assert s0.keys() == s1.keys()
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
    # and equal to one process that observes rank 0's rows followed by rank 1's
    ref = ClassMixtures(**_DIST_ARGS)
    for it in range(6):
        xs, ys = zip(*(_rank_batch(r, it) for r in range(2)))
        # one process seeing both ranks' rows: rank r's sources are offset so copies stay distinct per rank
        srcs = [torch.arange(len(y)) // 2 + r * 1000 for r, y in enumerate(ys)]
        ref.observe(torch.cat(xs), torch.cat(ys), it, sources=torch.cat(srcs))
        ref.step(it)
    assert torch.equal(ref.bank, s0["bank"]) and torch.equal(ref.bank_count, s0["bank_count"])
    loaded = ClassMixtures(**_DIST_ARGS)
    loaded.load_state_dict(s0)
    assert torch.equal(loaded.distinct_entries(), ref.distinct_entries())
    assert s0["initialized"].all()
    for key in ("weights", "means", "covariances"):
        torch.testing.assert_close(ref.state_dict()[key], s0[key])
