"""GMMClassPredictor (CCDM): densities vs scipy, EM recovery, ring buffer, sampling, state, DDP."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import cpm_d2  # noqa: F401  (compat fixes before detectron2)
from cpm_d2 import compat
from cpm_d2.modeling.class_predictor import CLASS_PREDICTOR_REGISTRY, build_class_predictor
from cpm_d2.modeling.class_predictor.gmm import GMMClassPredictor

torch.set_num_threads(1)


def _gmm(**kw):
    """A GMM head whose every label, "no object" (index C) included, is a mixture (the EM tests)."""
    args = dict(num_classes=1, embed_dim=2, num_components=2, covariance="diag", memory_size=64,
                update_interval=1, em_iters=1, momentum=0.0, eps=1e-4, no_object="gmm")
    args.update(kw)
    return GMMClassPredictor(**args)


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


def _set_params(g, rng, full):
    C1, M, D = g.num_classes + 1, g.num_components, g.embed_dim
    w = rng.dirichlet(np.ones(M), size=C1)
    mu = rng.normal(0.0, 1.5, size=(C1, M, D))
    if full:
        A = rng.normal(size=(C1, M, D, D)) * 0.6
        cov = A @ np.swapaxes(A, -1, -2) + 0.4 * np.eye(D)
    else:
        cov = rng.uniform(0.2, 2.0, size=(C1, M, D))
    g.weights.copy_(torch.from_numpy(w))
    g.means.copy_(torch.from_numpy(mu))
    g.covariances.copy_(torch.from_numpy(cov))
    # read back the float32-rounded values for the independent computation
    w, mu, cov = (t.double().numpy() for t in (g.weights, g.means, g.covariances))
    if not full:
        cov = np.stack([[np.diag(v) for v in row] for row in cov])
    return w, mu, cov


def _scipy_log_density(x, w, mu, cov):
    """(K, D) -> (K, C1): log sum_m w_cm N(x; mu_cm, cov_cm) with scipy."""
    C1, M = w.shape
    out = np.empty((x.shape[0], C1))
    for c in range(C1):
        comps = [np.log(w[c, m]) + multivariate_normal(mu[c, m], cov[c, m]).logpdf(x) for m in range(M)]
        out[:, c] = logsumexp(np.stack(comps, 1), axis=1)
    return out


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
        ll = g.log_likelihood(bank.double(), labels).reshape(3, n).mean(1)  # per class
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
    g.observe(torch.ones(1, D), torch.tensor([1]))  # class 1: one sample < max(M, 2)
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


# ----------------------------------------------------------------------------------- densities
@pytest.mark.parametrize("cov_type", ["diag", "full"])
@pytest.mark.parametrize("logit_norm", ["none", "per_dim"])
def test_scores_equal_scipy_log_density(cov_type, logit_norm):
    rng = np.random.default_rng(3)
    D = 5
    g = _gmm(num_classes=3, embed_dim=D, num_components=3, covariance=cov_type, logit_norm=logit_norm)
    w, mu, cov = _set_params(g, rng, full=cov_type == "full")
    x = rng.normal(0, 2.0, size=(4, 6, D)).astype(np.float32)
    expected = _scipy_log_density(x.reshape(-1, D).astype(np.float64), w, mu, cov).reshape(4, 6, 4)
    if logit_norm == "per_dim":
        expected = expected / D
    logits = g(torch.from_numpy(x))
    assert logits.shape == (4, 6, 4) and logits.dtype == torch.float32
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-5)
    # eval mode (inference) always scores with the exact density: eq. 1's posterior
    exact = expected * D if logit_norm == "per_dim" else expected
    g.eval()
    np.testing.assert_allclose(g(torch.from_numpy(x)).numpy(), exact, rtol=1e-5, atol=1e-4)
    g.train()
    # log_likelihood picks the exact (unscaled) density at the label
    lab = torch.tensor([0, 3, 2, 1, 1, 0])
    ll = g.log_likelihood(torch.from_numpy(x[0]).double(), lab)
    full = _scipy_log_density(x[0].astype(np.float64), w, mu, cov)
    np.testing.assert_allclose(ll.numpy(), full[np.arange(6), lab.numpy()], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cov_type", ["diag", "full"])
def test_softmax_is_bayes_posterior_with_uniform_prior(cov_type):
    rng = np.random.default_rng(4)
    g = _gmm(num_classes=2, embed_dim=2, num_components=2, covariance=cov_type, logit_norm="none")
    w, mu, cov = _set_params(g, rng, full=cov_type == "full")
    x = rng.normal(0, 1.0, size=(20, 2))
    # p(x|c) as plain densities, Bayes with p(c) = 1/3
    lik = np.stack(
        [sum(w[c, m] * multivariate_normal(mu[c, m], cov[c, m]).pdf(x) for m in range(2)) for c in range(3)], 1
    )
    post = lik / 3.0 / (lik / 3.0).sum(1, keepdims=True)
    got = torch.softmax(g(torch.from_numpy(x).float()), -1).numpy()
    np.testing.assert_allclose(got, post, atol=1e-5)
    # per_dim: softmax is the posterior of the tempered likelihood p(x|c)^(1/D)
    g.logit_norm = "per_dim"
    tempered = lik ** 0.5 / (lik ** 0.5).sum(1, keepdims=True)
    np.testing.assert_allclose(torch.softmax(g(torch.from_numpy(x).float()), -1).numpy(), tempered, atol=1e-5)
    assert (got.argmax(1) == tempered.argmax(1)).all()


def test_no_parameters_no_grad_into_buffers_and_grad_into_embeddings():
    g = _gmm(num_classes=3, embed_dim=4, num_components=2, memory_size=30, em_iters=2)
    g.observe(torch.randn(60, 4), torch.arange(60) % 4)
    g.update(0)
    assert list(g.parameters()) == []
    emb = torch.randn(2, 5, 4, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(g(emb).reshape(-1, 4), torch.arange(10) % 4)
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    for name, buf in g.named_buffers():
        assert not buf.requires_grad and buf.grad is None, name
    # embeddings stored by observe are detached copies
    e = torch.randn(3, 4, requires_grad=True)
    g.observe(e * 2, torch.tensor([0, 1, 2]))
    assert not g.bank.requires_grad


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


@pytest.mark.parametrize("cov_type", ["diag", "full"])
def test_state_dict_round_trip(cov_type):
    rng = np.random.default_rng(5)
    a = _gmm(num_classes=2, embed_dim=3, num_components=2, covariance=cov_type, memory_size=40, em_iters=3)
    a.observe(torch.from_numpy(rng.normal(size=(90, 3))).float(), torch.arange(90) % 3)
    a.update(0)
    b = _gmm(num_classes=2, embed_dim=3, num_components=2, covariance=cov_type, memory_size=40, seed=7)
    x = torch.randn(6, 3)
    before = b(x)  # fills b's factor cache for the old parameters
    b.load_state_dict(a.state_dict())
    assert not torch.equal(before, b(x))
    assert torch.equal(a(x), b(x))
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    sa = a.sample(labels, generator=torch.Generator().manual_seed(11))
    sb = b.sample(labels, generator=torch.Generator().manual_seed(11))
    assert torch.equal(sa, sb)
    for key in ("bank", "bank_count", "bank_ptr", "initialized"):
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


def test_objectness_scores_no_object_and_the_gmm_shares_the_rest():
    """no_object "objectness": softmax(logits) = [(1 - sigmoid(o)) p_GMM(c | q), sigmoid(o)], with the
    tempered posterior in training and eq. 1's exact one in eval; no mixture is fitted to "no object"."""
    torch.manual_seed(0)
    g = _gmm(num_classes=3, embed_dim=4, no_object="objectness", logit_norm="per_dim")
    x = torch.randn(6, 4, requires_grad=True)
    o = g.objectness(x).squeeze(-1).detach()
    for training, temperature in ((True, 4.0), (False, 1.0)):
        g.train(training)
        p = g(x).softmax(-1)
        post = torch.softmax(g.log_prob(x)[:, :3].detach() / temperature, -1)
        torch.testing.assert_close(p[:, 3], torch.sigmoid(o))
        torch.testing.assert_close(p[:, :3], (1 - torch.sigmoid(o))[:, None] * post)
    g.train()
    torch.nn.functional.cross_entropy(g(x), torch.tensor([0, 1, 2, 3, 3, 3])).backward()
    assert g.objectness.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    g.observe(torch.randn(5, 4), torch.tensor([0, 3, 1, 3, 3]))
    assert g.bank_count.tolist() == [1, 1, 0, 0]  # "no object" (3) is not banked
    with pytest.raises(ValueError, match="no_object"):
        _gmm(no_object="softmax")


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


def test_checkpoints_without_bank_iter_still_load():
    g = _gmm()
    g.observe(torch.ones(3, 2), torch.zeros(3, dtype=torch.long), iteration=7)
    state = g.state_dict()
    del state["bank_iter"]  # a checkpoint written before entries were stamped
    other = _gmm()
    other.load_state_dict(state)
    assert torch.equal(other.bank, g.bank) and int(other.bank_iter.max()) == 0


def test_bad_input_raises_clear_errors():
    g = _gmm(num_classes=2, embed_dim=3)
    with pytest.raises(ValueError, match="gmm.py.*labels must lie in"):
        g.observe(torch.zeros(2, 3), torch.tensor([0, 3 + 1]))
    with pytest.raises(ValueError, match="gmm.py.*embeddings"):
        g(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="covariance"):
        _gmm(covariance="spherical")


def test_built_from_config():
    from cpm_d2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.MASK_FORMER.CLASS_PREDICTOR = "GMMClassPredictor"
    cfg.MODEL.MASK_FORMER.GMM.NUM_COMPONENTS = 2
    cfg.MODEL.MASK_FORMER.GMM.COVARIANCE = "full"
    cfg.MODEL.MASK_FORMER.GMM.MEMORY_SIZE = 16
    assert CLASS_PREDICTOR_REGISTRY.get("GMMClassPredictor") is GMMClassPredictor
    g = build_class_predictor(cfg, num_classes=4, embed_dim=8)
    assert isinstance(g, GMMClassPredictor)
    assert g.covariances.shape == (5, 2, 8, 8) and g.bank.shape == (5, 16, 8)
    gc = cfg.MODEL.MASK_FORMER.GMM
    assert (g.update_interval, g.em_iters, g.momentum, g.eps) == (gc.UPDATE_INTERVAL, gc.EM_ITERS, gc.MOMENTUM, gc.EPS)
    assert g(torch.zeros(3, 8)).shape == (3, 5)


# ----------------------------------------------------------------------------------- distributed
_DIST_ARGS = dict(num_classes=2, embed_dim=3, num_components=2, memory_size=12, update_interval=2,
                  em_iters=2, momentum=0.5, no_object="gmm")  # the mixtures' state (DDP syncs parameters)


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
    g = GMMClassPredictor(**_DIST_ARGS)
    for it in range(6):
        x, y = _rank_batch(rank, it)
        g.observe(x, y)
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
    ref = GMMClassPredictor(**_DIST_ARGS)
    for it in range(6):
        xs, ys = zip(*(_rank_batch(r, it) for r in range(2)))
        ref.observe(torch.cat(xs), torch.cat(ys))
        ref.step(it)
    assert torch.equal(ref.bank, s0["bank"]) and torch.equal(ref.bank_count, s0["bank_count"])
    assert s0["initialized"].all()
    for key in ("weights", "means", "covariances"):
        torch.testing.assert_close(ref.state_dict()[key], s0[key])
