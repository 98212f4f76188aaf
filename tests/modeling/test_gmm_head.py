"""GMMClassPredictor (CCDM's class head): scores vs scipy, Bayes' posterior, the scoring options
(temperatures, best component, LayerNorm over classes, no-object rules), gradients, config, checkpoints."""
import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import cpm_d2  # noqa: F401  (compat fixes before detectron2)
from cpm_d2.config import get_cfg
from cpm_d2.modeling.class_predictor import CLASS_PREDICTOR_REGISTRY, build_class_predictor
from cpm_d2.modeling.class_predictor.gmm import GMMClassPredictor

torch.set_num_threads(1)


def _gmm(**kw):
    """A GMM head whose every label, "no object" (index C) included, is a mixture."""
    args = dict(num_classes=1, embed_dim=2, num_components=2, covariance="diag", memory_size=64,
                update_interval=1, em_iters=1, momentum=0.0, eps=1e-4, no_object="gmm")
    args.update(kw)
    return GMMClassPredictor(**args)


def _set_params(g, rng, full):
    m = g.mixtures
    C1, M, D = m.num_mixtures, m.num_components, m.embed_dim
    w = rng.dirichlet(np.ones(M), size=C1)
    mu = rng.normal(0.0, 1.5, size=(C1, M, D))
    if full:
        A = rng.normal(size=(C1, M, D, D)) * 0.6
        cov = A @ np.swapaxes(A, -1, -2) + 0.4 * np.eye(D)
    else:
        cov = rng.uniform(0.2, 2.0, size=(C1, M, D))
    m.weights.copy_(torch.from_numpy(w))
    m.means.copy_(torch.from_numpy(mu))
    m.covariances.copy_(torch.from_numpy(cov))
    # read back the float32-rounded values for the independent computation
    w, mu, cov = (t.double().numpy() for t in (m.weights, m.means, m.covariances))
    if not full:
        cov = np.stack([[np.diag(v) for v in row] for row in cov])
    return w, mu, cov


def _scipy_component_log_density(x, w, mu, cov):
    """(K, D) -> (K, C1, M): log w_cm + log N(x; mu_cm, cov_cm) with scipy."""
    C1, M = w.shape
    return np.stack([np.stack([np.log(w[c, m]) + multivariate_normal(mu[c, m], cov[c, m]).logpdf(x)
                               for m in range(M)], 1) for c in range(C1)], 1)


def _scipy_log_density(x, w, mu, cov):
    """(K, D) -> (K, C1): log sum_m w_cm N(x; mu_cm, cov_cm) with scipy."""
    return logsumexp(_scipy_component_log_density(x, w, mu, cov), axis=2)


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


def test_score_variance_floor_scores_with_raised_variances_and_leaves_the_mixtures_alone():
    """score_eps: the class scores are scipy's log-densities with every variance raised to at least
    score_eps; the fitted covariances, the exact log_prob and the prompt draws are unchanged."""
    rng = np.random.default_rng(7)
    D, floor = 4, 0.9
    g = _gmm(num_classes=2, embed_dim=D, num_components=2, logit_norm="none", score_eps=floor)
    w, mu, cov = _set_params(g, rng, full=False)  # variances in [0.2, 2.0]: some under the floor
    fitted = g.mixtures.covariances.clone()
    x = rng.normal(0, 1.5, size=(9, D))
    raised = np.stack([[np.diag(np.maximum(np.diag(c), floor)) for c in row] for row in cov])
    got = g(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _scipy_log_density(x, w, mu, raised), rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, _scipy_log_density(x, w, mu, cov), atol=1e-2)  # the floor mattered
    torch.testing.assert_close(g.mixtures.covariances, fitted)
    np.testing.assert_allclose(g.log_prob(torch.from_numpy(x)).numpy(), _scipy_log_density(x, w, mu, cov),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="SCORE_EPS"):
        _gmm(covariance="full", score_eps=0.1)


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
    assert not g.mixtures.bank.requires_grad


def test_objectness_scores_no_object_and_the_gmm_shares_the_rest():
    """no_object "objectness": softmax(logits) = [(1 - sigmoid(o)) p_GMM(c | q), sigmoid(o)], with the
    tempered posterior in training and eq. 1's exact one in eval; no mixture is fitted to "no object"."""
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
    assert g.mixtures.bank_count.tolist() == [1, 1, 0, 0]  # "no object" (3) is not banked


def test_no_object_softmax_is_one_logit_beside_the_class_logits():
    """no_object "softmax": in training the logits are [s_c / T, z] (Mask2Former's C+1 softmax, so
    p(no object) falls as the query nears a class's mixture); in eval p(no object) is the same and
    the classes share the rest by eq. 1's exact posterior. z's bias starts at the training logit of
    a query at a component's mean with the floor variance: -D/2 log(2 pi eps) / T."""
    torch.manual_seed(0)
    D, eps = 4, 1e-2
    g = _gmm(num_classes=3, embed_dim=D, no_object="softmax", logit_norm="sqrt_dim", eps=eps)
    assert g.objectness.bias.item() == pytest.approx(-0.5 * D * np.log(2 * np.pi * eps) / 2.0)
    labels = torch.arange(60) % 3
    g.observe(torch.eye(D)[labels] + 0.1 * torch.randn(60, D), labels)  # class c near e_c, spread at the floor
    g.update(0)
    x = torch.randn(6, D, requires_grad=True)
    z = g.objectness(x).squeeze(-1).detach()
    s = g.log_prob(x)[:, :3].detach().double()
    g.train()
    p_train = g(x).softmax(-1).detach().double()
    joint = torch.cat([s / 2.0, z.double()[:, None]], 1).softmax(-1)  # T = sqrt(4)
    torch.testing.assert_close(p_train, joint, rtol=1e-5, atol=1e-6)
    # with z fixed, a query at class 0's centre is less likely "no object" than one far from every class
    weight = g.objectness.weight.data.clone()
    g.objectness.weight.data.zero_()
    near, far = g(torch.eye(D)[:1]).softmax(-1)[0, 3], g(torch.full((1, D), 3.0)).softmax(-1)[0, 3]
    assert near < 0.8 and far > 0.999
    g.objectness.weight.data.copy_(weight)
    g.eval()
    p_eval = g(x).softmax(-1).detach().double()
    torch.testing.assert_close(p_eval[:, 3], joint[:, 3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p_eval[:, :3], (1 - joint[:, 3:]) * torch.softmax(s, -1), rtol=1e-5, atol=1e-6)
    g.train()
    torch.nn.functional.cross_entropy(g(x), torch.tensor([0, 1, 2, 3, 3, 3])).backward()
    assert g.objectness.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    g.observe(torch.randn(5, D), torch.tensor([0, 3, 1, 3, 3]))
    assert g.mixtures.bank_count.tolist()[3] == 0  # "no object" is not banked


def _objectness_accuracy(layers, steps=300):
    """Train only the no-object logit of a head (objectness_layers ``layers``) to tell 4 classes at
    +-e1, +-e2 from "no object" at +-e3 (no hyperplane separates them); return its accuracy."""
    torch.manual_seed(0)
    g = _gmm(num_classes=4, embed_dim=3, no_object="objectness", objectness_layers=layers)
    centres = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
    is_object = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    opt = torch.optim.Adam(g.objectness.parameters(), lr=0.05)
    for _ in range(steps):
        pick = torch.randint(0, 6, (64,))
        x = centres[pick] + 0.05 * torch.randn(64, 3)
        o = g.objectness(x).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(o, (~is_object[pick]).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p_no_object = g(centres).softmax(-1)[:, -1]
    return ((p_no_object < 0.5) == is_object).float().mean().item()


def test_objectness_mlp_separates_what_one_hyperplane_cannot():
    """objectness_layers > 1: the no-object logit is an MLP; with classes spread around "no object"
    a linear logit gets at most 4 of 6 centres right, a 2-layer MLP all of them."""
    assert isinstance(_gmm(no_object="objectness").objectness, torch.nn.Linear)  # default: linear, same keys
    assert _objectness_accuracy(1) <= 4 / 6 + 1e-6
    assert _objectness_accuracy(2) == 1.0
    # "softmax": the MLP's output bias starts where the linear logit's does
    lin = _gmm(num_classes=3, embed_dim=4, no_object="softmax", eps=1e-2)
    mlp = _gmm(num_classes=3, embed_dim=4, no_object="softmax", eps=1e-2, objectness_layers=3)
    assert len(mlp.objectness) == 5 and mlp.objectness[-1].bias.item() == pytest.approx(lin.objectness.bias.item())
    with pytest.raises(ValueError, match="MODEL.MASK_FORMER.GMM.OBJECTNESS_LAYERS"):
        _gmm(no_object="objectness", objectness_layers=0)


@pytest.mark.parametrize("logit_norm,temperature", [("per_dim", 4.0), ("sqrt_dim", 2.0)])
def test_tempered_test_logits_keep_the_training_posterior_in_eval(logit_norm, temperature):
    """test_logits "tempered": eval-mode logits are the training ones (posterior of p(x|c)^(1/T));
    "posterior" (default): eq. 1 exactly. Either way the class argmax is the same."""
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    heads = {}
    for test_logits in ("posterior", "tempered"):
        g = _gmm(num_classes=3, embed_dim=4, no_object="objectness", logit_norm=logit_norm, test_logits=test_logits)
        g.observe(torch.randn(40, 4), torch.arange(40) % 3)
        g.update(0)
        heads[test_logits] = g
    heads["tempered"].load_state_dict(heads["posterior"].state_dict())
    post = torch.softmax(heads["posterior"].log_prob(x)[:, :3], -1)
    train = heads["tempered"].train()(x).detach()
    for name, g in heads.items():
        g.eval()
        p = g(x).detach().softmax(-1)
        o = torch.sigmoid(g.objectness(x).squeeze(-1)).detach()
        want = post if name == "posterior" else torch.softmax(g.log_prob(x)[:, :3] / temperature, -1)
        torch.testing.assert_close(p[:, :3], (1 - o)[:, None] * want.float())
        assert (p[:, :3].argmax(1) == post.argmax(1)).all()
    torch.testing.assert_close(heads["tempered"](x).detach(), train)
    with pytest.raises(ValueError, match="TEST_LOGITS"):
        _gmm(test_logits="sharp")


def test_best_component_and_class_layer_norm_scores():
    """component_score "max" scores a class by its best component (GMMSeg); logit_norm
    "class_layer_norm" is a LayerNorm over the classes' scores, in training and in eval."""
    rng = np.random.default_rng(8)
    g = _gmm(num_classes=3, embed_dim=3, num_components=3, component_score="max", logit_norm="class_layer_norm")
    w, mu, cov = _set_params(g, rng, full=False)
    x = rng.normal(0, 1.5, size=(7, 3))
    best = _scipy_component_log_density(x, w, mu, cov).max(2)  # (7, 4)
    torch.testing.assert_close(g.class_scores(torch.from_numpy(x)), torch.from_numpy(best), rtol=1e-9, atol=1e-9)
    expected = (best - best.mean(1, keepdims=True)) / np.sqrt(best.var(1, keepdims=True) + 1e-5)
    for training in (True, False):
        g.train(training)
        np.testing.assert_allclose(g(torch.from_numpy(x).float()).detach().numpy(), expected, rtol=1e-4, atol=1e-4)
    # with the objectness logit the LayerNorm runs over the C classes only
    h = _gmm(num_classes=3, embed_dim=3, num_components=3, logit_norm="class_layer_norm", no_object="objectness")
    assert h.class_norm.normalized_shape == (3,)
    assert h(torch.randn(4, 3)).shape == (4, 4)


def test_normalized_head_ignores_the_embedding_norm():
    g = _gmm(num_classes=2, embed_dim=4, normalize=True)
    x = torch.randn(5, 4)
    torch.testing.assert_close(g(x), g(7.0 * x))


def test_old_checkpoints_with_the_mixture_buffers_on_the_head_load():
    """State dicts written when the buffers lived on the predictor (``weights``, ``bank``, ...) load
    into ``mixtures.*``."""
    a = _gmm(num_classes=2, embed_dim=3)
    a.observe(torch.randn(30, 3), torch.arange(30) % 3)
    a.update(0)
    old = {(k[len("mixtures."):] if k.startswith("mixtures.") and not k.endswith(("bank_source", "bank_norm")) else k): v
           for k, v in a.state_dict().items() if not k.endswith(("bank_source", "bank_norm"))}
    assert "weights" in old and "mixtures.weights" not in old
    b = _gmm(num_classes=2, embed_dim=3, seed=5)
    b.load_state_dict(old)
    x = torch.randn(4, 3)
    assert torch.equal(a(x), b(x))


def test_bad_input_raises_clear_errors():
    g = _gmm(num_classes=2, embed_dim=3)
    with pytest.raises(ValueError, match="labels must lie in"):
        g.observe(torch.zeros(2, 3), torch.tensor([0, 3 + 1]))
    with pytest.raises(ValueError, match="embeddings"):
        g(torch.zeros(2, 4))
    for key, value in (("logit_norm", "softmax"), ("component_score", "mean"), ("no_object", "sigmoid")):
        with pytest.raises(ValueError, match=f"MODEL.MASK_FORMER.GMM.{key.upper()}"):
            _gmm(**{key: value})


def test_built_from_config_and_old_keys_are_reported_as_renamed(tmp_path):
    cfg = get_cfg()
    cfg.MODEL.MASK_FORMER.CLASS_PREDICTOR = "GMMClassPredictor"
    cfg.MODEL.MASK_FORMER.GMM.NUM_COMPONENTS = 2
    cfg.MODEL.MASK_FORMER.GMM.COVARIANCE = "full"
    cfg.MODEL.MASK_FORMER.GMM.MEMORY_SIZE = 16
    cfg.MODEL.MASK_FORMER.GMM.MIN_ENTRIES_PER_COMPONENT = 3
    assert CLASS_PREDICTOR_REGISTRY.get("GMMClassPredictor") is GMMClassPredictor
    g = build_class_predictor(cfg, num_classes=4, embed_dim=8)
    m = g.mixtures
    assert isinstance(g, GMMClassPredictor)
    assert m.covariances.shape == (5, 2, 8, 8) and m.bank.shape == (5, 16, 8)
    gc = cfg.MODEL.MASK_FORMER.GMM
    assert (m.update_interval, m.em_iters, m.momentum, m.eps, m.min_entries, m.reseed_below, m.reseed, m.estep) == (
        gc.UPDATE_INTERVAL, gc.EM_ITERS, gc.MOMENTUM, gc.EPS, 6, gc.RESEED_BELOW, gc.RESEED, gc.ESTEP)
    assert g(torch.zeros(3, 8)).shape == (3, 5)
    old = tmp_path / "old.yaml"
    old.write_text("MODEL:\n  CPM:\n    GMM:\n      NUM_COMPONENTS: 5\n")
    with pytest.raises(KeyError, match="MODEL.CPM.GMM was renamed to MODEL.MASK_FORMER.GMM"):
        get_cfg().merge_from_file(str(old))
    with pytest.raises(KeyError, match="MODEL.CPM.GMM.EPS was renamed to MODEL.MASK_FORMER.GMM.EPS"):
        get_cfg().merge_from_list(["MODEL.CPM.GMM.EPS", "0.1"])


def test_per_prediction_mixtures_bank_fit_and_score_their_own_prediction():
    """num_predictions P = 3: rows observed with prediction i go to set i's banks only (None = the
    final set); forward(x, prediction=i) scores with set i; prompts come from the final set."""
    torch.manual_seed(0)
    g = _gmm(num_classes=2, embed_dim=3, num_components=1, no_object="objectness", logit_norm="none",
             num_predictions=3, min_entries=2)
    assert g.num_predictions == 3 and len(g.aux_mixtures) == 2
    shift = torch.tensor([0.0, 5.0, -5.0])  # prediction i's embeddings sit at shift[i] on axis 0
    x = torch.randn(30, 3) * 0.3
    labels = torch.arange(30) % 2
    emb = torch.cat([x + torch.tensor([s, 0.0, 0.0]) for s in shift])
    which = torch.arange(3).repeat_interleave(30)
    g.observe(emb, labels.repeat(3), 0, torch.arange(30).repeat(3), which)
    g.observe(x[:4] + torch.tensor([-5.0, 0.0, 0.0]), labels[:4], 1)  # no predictions given: the final set
    assert [m.bank_count.tolist() for m in (g.aux_mixtures[0], g.aux_mixtures[1], g.mixtures)] == \
        [[15, 15, 0], [15, 15, 0], [17, 17, 0]]
    assert g.update(1)
    for i, s in enumerate(shift):
        mean = g.mixtures_of(i).means[0, 0, 0].item()
        assert mean == pytest.approx(s.item(), abs=0.5), (i, mean)
    assert g.mixtures_of(None) is g.mixtures and g.mixtures_of(2) is g.mixtures
    q = torch.randn(5, 3)
    g.eval()
    for i in range(3):
        want = torch.log_softmax(g.mixtures_of(i).log_prob(q)[:, :2], -1).float() + \
            torch.nn.functional.logsigmoid(-g.objectness(q)).detach()
        torch.testing.assert_close(g(q, prediction=i)[:, :2].detach(), want)
    assert not torch.allclose(g(q, prediction=0), g(q, prediction=1))
    torch.testing.assert_close(g(q), g(q, prediction=2))
    z = g.sample(torch.zeros(200, dtype=torch.long))
    assert z[:, 0].mean().item() == pytest.approx(-5.0, abs=0.3)  # the final set's class-0 mean
    with pytest.raises(ValueError, match="prediction 3 out of range"):
        g(q, prediction=3)


def _fitted(adapter):
    """A 3-class head (D = 4) fitted to two well separated classes (0 and 1), same seed every call."""
    g = _gmm(num_classes=3, embed_dim=4, num_components=1, memory_size=40, em_iters=3, no_object="objectness",
             min_entries=4, prompt_adapter=adapter, normalize=False)
    centres = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0]])
    labels = torch.arange(40) % 2
    g.observe(centres[labels] + 0.1 * torch.randn(40, 4, generator=torch.Generator().manual_seed(0)), labels)
    g.update(0)
    return g, centres


@pytest.mark.parametrize("adapter", ["linear", "class_offset"])
def test_prompt_adapters_start_at_the_draws_and_learn_from_the_prompts(adapter):
    plain, _ = _fitted("none")
    g, centres = _fitted(adapter)
    labels = torch.tensor([0, 1, 1, 0])
    draw = plain.sample(labels, torch.Generator().manual_seed(5))
    assert not draw.requires_grad  # the draws themselves carry no gradient
    assert torch.allclose(g.sample(labels, torch.Generator().manual_seed(5)), draw, atol=1e-6)
    # the prompting losses reach the adapter: pull class 0's prompts to t0 and class 1's to t1
    targets = torch.tensor([[0.0, 0, 2.0, 0], [0, 0, 0, -2.0]])
    draws = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(g.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        ((g.sample(labels, draws) - targets[labels]) ** 2).sum(-1).mean().backward()
        opt.step()
    with torch.no_grad():
        prompts = g.sample(torch.tensor([0] * 200 + [1] * 200), draws)
        means = torch.stack([prompts[:200].mean(0), prompts[200:].mean(0)])
    # from 3.6 away to within Adam's last steps of the targets
    assert (means - targets).norm(dim=1).max() < 0.25 < 3.5 < (centres - targets).norm(dim=1).min()
    assert torch.allclose(g.mixtures.means[:2, 0], plain.mixtures.means[:2, 0])  # EM's parameters untouched
    if adapter == "class_offset":
        # a class that was never prompted keeps a zero offset
        assert torch.equal(g.prompt_offset.weight[2], torch.zeros(4))


def test_prompt_adapter_from_config_and_bad_value():
    cfg = get_cfg()
    cfg.MODEL.MASK_FORMER.CLASS_PREDICTOR = "GMMClassPredictor"
    assert cfg.MODEL.MASK_FORMER.GMM.PROMPT_ADAPTER == "none"
    assert list(build_class_predictor(cfg, num_classes=4, embed_dim=8).parameters()) != []  # objectness only
    cfg.MODEL.MASK_FORMER.GMM.PROMPT_ADAPTER = "class_offset"
    assert build_class_predictor(cfg, num_classes=4, embed_dim=8).prompt_offset.weight.shape == (5, 8)
    cfg.MODEL.MASK_FORMER.GMM.PROMPT_ADAPTER = "linear"
    assert torch.equal(build_class_predictor(cfg, num_classes=4, embed_dim=8).prompt_map.weight, torch.eye(8))
    with pytest.raises(ValueError, match="MODEL.MASK_FORMER.GMM.PROMPT_ADAPTER"):
        _gmm(prompt_adapter="mlp")


def test_point_prompts_on_the_gmm_head_are_learnable_rows_available_before_any_fit():
    g = _gmm(num_classes=3, embed_dim=4, no_object="objectness", prompts="embedding")
    labels = torch.tensor([2, 0, 2])
    assert g.can_prompt(labels).all() and not g.mixtures.fitted.any()  # no fit needed to prompt
    z = g.sample(labels)
    assert torch.equal(z, g.prompts.weight[labels]) and torch.equal(z[0], z[2])  # one fixed row per class
    z.sum().backward()
    assert torch.equal(g.prompts.weight.grad[:, 0], torch.tensor([1.0, 0.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="MODEL.CPM.GMM_HEAD_PROMPTS"):
        _gmm(prompts="points")
    with pytest.raises(ValueError, match="PROMPT_ADAPTER 'linear' maps GMM draws"):
        _gmm(prompts="embedding", prompt_adapter="linear")
    cfg = get_cfg()
    cfg.MODEL.MASK_FORMER.CLASS_PREDICTOR = "GMMClassPredictor"
    cfg.MODEL.CPM.GMM_HEAD_PROMPTS = "embedding"
    assert build_class_predictor(cfg, num_classes=4, embed_dim=8).prompt_source == "gmm"  # CPM off: no prompts
    cfg.MODEL.CPM.ENABLED = True
    assert build_class_predictor(cfg, num_classes=4, embed_dim=8).prompts.weight.shape == (5, 8)


@pytest.mark.parametrize("cov_type", ["diag", "full"])
def test_learned_mean_offsets_score_with_shifted_means_and_leave_em_and_draws_alone(cov_type):
    """learned_mean_offsets: the scores are scipy's log-densities with every mean moved by its
    offset (zero at the start: the plain head's scores); EM's means and the prompt draws ignore it."""
    rng = np.random.default_rng(11)
    D = 3
    g = _gmm(num_classes=2, embed_dim=D, num_components=2, covariance=cov_type, logit_norm="none",
             learned_mean_offsets=True)
    w, mu, cov = _set_params(g, rng, full=cov_type == "full")
    x = rng.normal(0, 1.5, size=(7, D))
    assert g.mean_offsets.shape == (1, 3, 2, D) and not g.mean_offsets.any()
    np.testing.assert_allclose(g(torch.from_numpy(x)).detach().numpy(), _scipy_log_density(x, w, mu, cov),
                               rtol=1e-6, atol=1e-6)
    offset = rng.normal(0, 0.7, size=(3, 2, D))
    with torch.no_grad():
        g.mean_offsets[0] = torch.from_numpy(offset)
    offset = g.mean_offsets[0].double().detach().numpy()  # float32-rounded
    np.testing.assert_allclose(g(torch.from_numpy(x)).detach().numpy(), _scipy_log_density(x, w, mu + offset, cov),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g.log_prob(torch.from_numpy(x)).numpy(), _scipy_log_density(x, w, mu, cov),
                               rtol=1e-6, atol=1e-6)  # the mixtures' own density
    torch.testing.assert_close(g.mixtures.means.double().numpy(), mu)
    draws = g.sample(torch.zeros(4000, dtype=torch.long), torch.Generator().manual_seed(0))
    assert not draws.requires_grad
    np.testing.assert_allclose(draws.mean(0).numpy(), (w[0, :, None] * mu[0]).sum(0), atol=0.1)


def test_learned_mean_offsets_are_trained_by_the_class_loss_to_fix_misplaced_means():
    """Two classes whose EM means sit on each other's data (every query misclassified): a CE on the
    logits trains the offsets until every query is classified right, while EM's means stay put."""
    torch.manual_seed(0)
    g = _gmm(num_classes=2, embed_dim=2, num_components=1, no_object="objectness", normalize=False,
             learned_mean_offsets=True, logit_norm="sqrt_dim")
    centres = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    with torch.no_grad():
        g.mixtures.means[:2, 0] = centres.flip(0)  # class 0's mean on class 1's data and vice versa
        g.mixtures.covariances.fill_(0.5)
    means = g.mixtures.means.clone()
    labels = torch.arange(200) % 2
    x = centres[labels] + 0.3 * torch.randn(200, 2)
    assert (g(x)[:, :2].argmax(-1) != labels).float().mean() > 0.95
    opt = torch.optim.Adam([g.mean_offsets], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.nll_loss(g(x), labels).backward()
        opt.step()
    assert (g(x)[:, :2].argmax(-1) == labels).float().mean() > 0.95
    torch.testing.assert_close(g.mixtures.means, means)
    assert g.mean_offsets.grad[0, 2].abs().sum() == 0  # "no object" has no mixture here: no gradient


def test_learned_mean_offsets_from_config_one_set_per_prediction():
    cfg = get_cfg()
    cfg.MODEL.MASK_FORMER.CLASS_PREDICTOR = "GMMClassPredictor"
    assert cfg.MODEL.MASK_FORMER.GMM.LEARNED_MEAN_OFFSETS is False
    assert not hasattr(build_class_predictor(cfg, num_classes=4, embed_dim=8), "mean_offsets")
    cfg.MODEL.MASK_FORMER.GMM.LEARNED_MEAN_OFFSETS = True
    assert build_class_predictor(cfg, num_classes=4, embed_dim=8).mean_offsets.shape == (1, 5, 3, 8)
    g = _gmm(num_classes=1, embed_dim=2, num_components=1, logit_norm="none", learned_mean_offsets=True,
             num_predictions=2)
    with torch.no_grad():
        g.mean_offsets[0] = 1.0  # prediction 0's set only
    q = torch.randn(4, 2)
    want = g.mixtures_of(0).component_log_prob(q, 0.0, torch.ones(2, 1, 2))[..., 0]
    torch.testing.assert_close(g(q, prediction=0).double().detach(), want)
    torch.testing.assert_close(g(q).double().detach(), g.mixtures.log_prob(q))
    with pytest.raises(ValueError, match="mean_offset must be"):
        g.mixtures.component_log_prob(q, 0.0, torch.ones(2, 2))
