"""CPM training (the prompt pass + CPMLoss, cpm_d2/modeling/cpm/): loss keys of every ablation
config, fixed VCP assignment and its normaliser, ACP target/loss, LAMBDA x WEIGHT scaling,
normalisation statistics untouched by the mixture, inference untouched by CPM, empty batches,
learnable point prompts, a short training run with GMM updates, and a checkpoint round trip of
the GMM state. The fused pass against separate decodes: tests/modeling/test_prompt_pass.py. Tiny sizes,
CPU, one thread."""
from pathlib import Path

import numpy as np
import pytest
import torch

import cpm_d2  # noqa: F401  (compat fixes + registries)
import cpm_d2.modeling.cpm.cpm_loss as cpm_loss_module
import cpm_d2.modeling.criterion as criterion_module
from detectron2.checkpoint import DetectionCheckpointer
from cpm_d2.config import get_cfg
from detectron2.modeling import build_model
from cpm_d2.data.dataset_mapper import instances_from_sem_seg
from cpm_d2.modeling.class_predictor.mixture import PROMPT_SOURCE

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "synthetic" / "baseline_r18_tiny.yaml"
CPM_TINY = ROOT / "configs" / "synthetic" / "cpm_r18_tiny.yaml"
ABLATIONS = ROOT / "configs" / "ablations"
T_AUDIO, F_AUDIO = 32, 24  # audio grid of the test inputs; audio masks are (8, 6)
LOG_OFFSET = 1e-6  # MODEL.AUDIO.LOG_OFFSET

AGN_KEYS = {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1", "_2")}  # 1 audio + 3 visual layers
VCP_KEYS = {f"loss_vcp_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1", "_2")}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread while these tests run (set per test: other test modules set their own
    count at import). On the shared 2-core machine two threads made the training test ~15x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ fixtures
def _load(path):
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    return cfg


def _tiny_sizes(cfg):
    """Replace the model sizes of ``cfg`` by baseline_r18_tiny.yaml's, keeping its switches and C."""
    tiny = _load(TINY)
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    predictor, gmm = cfg.MODEL.MASK_FORMER.CLASS_PREDICTOR, cfg.MODEL.MASK_FORMER.GMM.clone()
    for node in ("RESNETS", "AUDIO", "SEM_SEG_HEAD", "MASK_FORMER"):
        setattr(cfg.MODEL, node, tiny.MODEL[node].clone())
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    cfg.MODEL.MASK_FORMER.CLASS_PREDICTOR = predictor
    cfg.MODEL.MASK_FORMER.GMM = gmm  # the class head's switches
    cfg.MODEL.CPM.PCL.NUM_PIXELS = 128
    cfg.MODEL.MASK_FORMER.GMM.MEMORY_SIZE = 32
    cfg.MODEL.MASK_FORMER.GMM.MIN_ENTRIES_PER_COMPONENT = 1  # M = 7 x 4 copies fits the small bank
    return cfg


def _cpm_cfg(num_classes=5, **overrides):
    cfg = _load(CPM_TINY)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


def _build(cfg, seed=0, prompts_ready=True):
    """The model of ``cfg``; with ``prompts_ready`` its per-class mixtures count as fitted, so that
    the first step already prompts every class from the prior (a fresh model prompts a class only
    once its mixture has been fitted to enough bank entries)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    mixtures = getattr(model.class_predictor, "mixtures", None)
    if prompts_ready and mixtures is not None:
        mixtures.initialized.fill_(True)
    return model


def _frame(sem, seed, noise="random", name=None):
    """A mapper-output dict for label map ``sem``; noise: "random", "zero" or None (no noise_audio)."""
    h, w = sem.shape
    g = torch.Generator().manual_seed(seed)
    inst = instances_from_sem_seg(sem)
    mag = torch.rand(1, T_AUDIO, F_AUDIO, generator=g) + 0.05
    d = {"file_name": name or f"frame_{seed}.jpg", "image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
         "sem_seg": sem, "instances": inst, "audio": mag, "height": h, "width": w}
    if noise == "random":
        d["noise_audio"] = torch.rand(1, T_AUDIO, F_AUDIO, generator=g)
    elif noise == "zero":
        d["noise_audio"] = torch.zeros(1, T_AUDIO, F_AUDIO)
    return d


def _sem(h=64, w=80, boxes=()):
    s = torch.zeros(h, w, dtype=torch.long)
    for c, (y0, y1, x0, x1) in boxes:
        s[y0:y1, x0:x1] = c
    return s


def _grid_points(src_masks, *args, **kwargs):
    """Deterministic stand-in for the criterion's random point sampling: one 16x16 grid for every mask."""
    ys, xs = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    pts = torch.stack([(xs.flatten() + 0.5) / 16, (ys.flatten() + 0.5) / 16], -1)
    return pts.expand(src_masks.shape[0], -1, -1).to(src_masks)


def _fixed_prompts(model, table):
    """Make the class head return table[label] (deterministic prompts)."""
    model.class_predictor.sample = lambda labels, generator=None: table[labels.long().cpu()].clone()


def _pieces(model, batch):
    """The class-agnostic pieces of a batch: visual and clean audio encodings, targets and l_agn's
    mask normaliser."""
    images = model.preprocess_image(batch)
    mags = model.preprocess_audio(batch)
    targets = model.prepare_targets(batch, images)
    num_masks = model.criterion.num_masks(targets, mags.device)
    return model.encode_visual(images.tensor), model.encode_audio(model.log_spectrogram(mags)), targets, num_masks


def _prompt_losses(model, batch):
    """The CPM losses of one training forward, the class head's state left as it is (no observe,
    no EM), so that repeated calls prompt and classify with the same head."""
    model.observe_assignments = lambda *args, **kwargs: None
    try:
        return _cpm_part(model(batch))
    finally:
        del model.observe_assignments


def _cpm_part(losses):
    return {k: v for k, v in losses.items() if k not in AGN_KEYS}


# ------------------------------------------------------------------------------------------ (a) ablations
# Paper Table 4 / 5 rows: (class predictor, ACP, VCP, PCL, GMM components or None).
ROWS = {
    "t4_1_baseline": ("LinearClassPredictor", False, False, False, None),
    "t4_2_ccdm": ("GMMClassPredictor", False, False, False, 3),
    "t4_3_ccdm_vcp": ("GMMClassPredictor", False, True, False, 3),
    "t4_4_ccdm_acp": ("GMMClassPredictor", True, False, False, 3),
    "t4_5_ccdm_acp_vcp": ("GMMClassPredictor", True, True, False, 3),
    "t4_6_cpm_full": ("GMMClassPredictor", True, True, True, 3),
    "t5_point_rep": ("LinearClassPredictor", True, True, True, None),
    "t5_dist_rep": ("GMMClassPredictor", True, True, True, 3),
    "t5_gmm_m1": ("GMMClassPredictor", True, True, True, 1),
    "t5_gmm_m3": ("GMMClassPredictor", True, True, True, 3),
    "t5_gmm_m5": ("GMMClassPredictor", True, True, True, 5),
    "t5_gmm_m7": ("GMMClassPredictor", True, True, True, 7),
    "x_softmax_gmm_prompts": ("LinearClassPredictor", True, True, True, None),
    "x_softmax_fixed_random_prompts": ("LinearClassPredictor", True, True, True, None),
    "x_pcl_batch_negatives": ("GMMClassPredictor", True, True, True, 3),
    "x_lambda_0.25": ("GMMClassPredictor", True, True, True, 3),
    "x_vcp_mixture_audio": ("GMMClassPredictor", True, True, True, 3),
    **{row: ("GMMClassPredictor", True, True, True, 3) for row in (
        "x_gmm_observe_last", "x_gmm_per_prediction", "x_gmm_observe_correct", "x_gmm_sinkhorn", "x_gmm_raw_embeddings",
        "x_gmm_gmmseg_scoring", "x_gmm_no_object_mixture", "x_gmm_no_object_softmax", "x_gmm_prompt_scale_0",
        "x_gmm_prompt_scale_0.5", "x_gmm_prompt_adapter_linear", "x_gmm_prompt_class_offset",
        "x_gmm_prompt_class_offset_scale_0.5", "x_gmm_head_point_prompts", "x_gmm_observe_prompts",
        "x_gmm_head_point_prompts_observe_prompts", "x_gmm_no_reseed",
        "x_gmm_reseed_split", "x_gmm_eps_1e-3", "x_gmm_eps_3e-2", "x_gmm_eps_1e-3_prompt_eps_1e-2",
        "x_gmm_eps_1e-3_score_eps_1e-2", "x_gmm_class_relative_floor", "x_gmm_class_layer_norm", "x_gmm_tied", "x_gmm_per_dim", "x_gmm_learned_temperature", "x_vcp_no_class_term",
        "x_vcp_class_weight_0.1", "x_gmm_learned_mean_offsets")},
}


def test_every_ablation_row_has_a_config():
    files = {p.stem for p in ABLATIONS.glob("*.yaml")} - {"Base-Ablation"}
    assert files == set(ROWS)


@pytest.mark.parametrize("row", sorted(ROWS))
def test_ablation_config_loss_keys(row):
    predictor, acp, vcp, pcl, m = ROWS[row]
    cfg = _load(ABLATIONS / f"{row}.yaml")
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 71 and cfg.DATASETS.TRAIN == ("avss_train",)
    model = _build(_tiny_sizes(cfg))
    assert type(model.class_predictor).__name__ == predictor
    if m is not None:
        assert model.class_predictor.mixtures.num_components == m
    enabled = acp or vcp or pcl
    assert (model.cpm_loss is not None) == enabled
    model.train()
    batch = [_frame(_sem(boxes=[(5, (4, 30, 4, 40)), (40, (34, 60, 44, 76))]), 1),
             _frame(_sem(boxes=[(70, (10, 50, 10, 50))]), 2)]
    losses = model(batch)
    expected = set(AGN_KEYS)
    expected |= {"loss_acp"} if acp else set()
    expected |= VCP_KEYS if vcp else set()
    expected |= {"loss_pcl"} if pcl else set()
    assert set(losses) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    if enabled:  # real prompts: non-trivial terms (but the class term VCP.CLASS_WEIGHT 0 switches off)
        off = cfg.MODEL.CPM.VCP.CLASS_WEIGHT == 0
        assert all((v.item() == 0) if off and k.startswith("loss_vcp_ce") else (v.item() > 0)
                   for k, v in _cpm_part(losses).items())


def test_pcl_projects_both_sides_and_needs_no_matching_dims():
    """PCL compares projections (its own heads), so the audio and pixel widths may differ."""
    model = build_model(_cpm_cfg(**{"MODEL.AUDIO.PIXEL_DECODER_DIM": "32", "MODEL.CPM.PCL.PROJ_DIM": "16"}))
    assert model.cpm_loss.pcl_audio_proj[0].in_features == 32 and model.cpm_loss.pcl_audio_proj[-1].out_features == 16
    assert model.cpm_loss.pcl_pixel_proj[0].in_features == 64 and model.cpm_loss.pcl_pixel_proj[-1].out_features == 16
    no_pcl = build_model(_cpm_cfg(**{"MODEL.CPM.PCL.ENABLED": "False"}))
    assert not any("pcl" in k for k in no_pcl.state_dict())
    with pytest.raises(ValueError, match="PCL.NEGATIVES"):
        build_model(_cpm_cfg(**{"MODEL.CPM.PCL.NEGATIVES": "everything"}))
    with pytest.raises(ValueError, match="MODEL.CPM.ENABLED"):
        build_model(_cpm_cfg(**{"MODEL.CPM.ACP.ENABLED": "False", "MODEL.CPM.VCP.ENABLED": "False",
                                "MODEL.CPM.PCL.ENABLED": "False"}))


# ------------------------------------------------------------------------------------------ (b) VCP
def test_vcp_assignment_is_fixed_by_prompt_class(monkeypatch):
    monkeypatch.setattr(criterion_module, "get_uncertain_point_coords_with_randomness", _grid_points)
    model = _build(_cpm_cfg(**{"MODEL.CPM.ACP.ENABLED": "False", "MODEL.CPM.PCL.ENABLED": "False"}))
    model.train()
    batch = [_frame(_sem(boxes=[(1, (2, 30, 2, 36)), (2, (34, 62, 2, 36)), (3, (10, 50, 44, 78))]), 1),
             _frame(_sem(boxes=[(4, (10, 40, 20, 60))]), 2)]
    table = torch.randn(6, model.transformer_decoder.hidden_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        visual, audio, targets, num_masks = _pieces(model, batch)
    assert num_masks == 6  # l_agn's normaliser: 4 masks in image 0, 2 in image 1 (backgrounds included)

    def vcp(order, relabel=None):
        """Prompts of image 0 in ``order``; prompt vectors table[relabel[label]] (default: own class)."""
        labels = [torch.tensor(order), torch.tensor([4])]
        monkeypatch.setattr(model.prompt_pass, "prompt_labels", lambda *a: [x.clone() for x in labels])
        mapping = torch.tensor(relabel or [0, 1, 2, 3, 4, 5])
        model.class_predictor.sample = lambda lab, generator=None: table[mapping[lab.long().cpu()]].clone()
        with torch.no_grad():
            out = _prompt_losses(model, batch)
        assert set(out) == VCP_KEYS
        return out

    ref = vcp([1, 2, 3])
    permuted = vcp([3, 1, 2])  # the same (prompt, class) pairs in another order
    for k in VCP_KEYS:
        assert torch.allclose(ref[k], permuted[k], rtol=1e-5, atol=1e-6), k
    # Same query set, but every prompt of image 0 is now paired with another class's mask: a loss
    # that matched prompts to targets would not change; the fixed assignment does.
    crossed = vcp([1, 2, 3], relabel=[0, 2, 3, 1, 4, 5])
    assert abs(sum(crossed.values()).item() - sum(ref.values()).item()) > 1e-3

    # Independent: the criterion on the decoded prompts with the pairs written out by hand, targets
    # restricted to the prompted classes, mask terms divided by l_agn's number of masks (6, not the
    # 4 prompts), weighted by weight_dict.
    with torch.no_grad():
        q = torch.zeros(2, 3, table.shape[1])
        q[0] = table[[1, 2, 3]]
        q[1, 0] = table[4]
        pad = torch.tensor([[False, False, False], [False, True, True]])
        out = model.decode(visual, audio, queries=q, query_padding_mask=pad)
        tg = [{"labels": torch.tensor([1, 2, 3]), "masks": torch.stack([targets[0]["masks"][targets[0]["labels"] == c][0]
                                                                         for c in (1, 2, 3)])},
              {"labels": torch.tensor([4]), "masks": targets[1]["masks"][targets[1]["labels"] == 4]}]
        pairs = [(torch.arange(3), torch.arange(3)), (torch.arange(1), torch.arange(1))]
        raw = model.criterion(out, tg, indices=pairs, num_masks=6.0)
        per_prompt = model.criterion(out, tg, indices=pairs, num_masks=4.0)
        # the CE is over the C classes only (no-object logit left out), a plain mean over the 4 prompts
        rows = [out["pred_logits"][0, 0], out["pred_logits"][0, 1], out["pred_logits"][0, 2], out["pred_logits"][1, 0]]
        ce = -sum(torch.log_softmax(r[:-1], -1)[c] for r, c in zip(rows, (1, 2, 3, 4))) / 4
    assert ref["loss_vcp_ce"].item() == pytest.approx(model.weight_dict["loss_ce"] * ce.item(), rel=1e-5)
    for k, v in raw.items():
        if "ce" in k:
            continue
        expected = v * model.weight_dict[k]
        assert torch.allclose(ref["loss_vcp_" + k[5:]], expected, rtol=1e-5, atol=1e-6), k
        # normalised by 4 prompts the mask terms would be 1.5x larger
        assert per_prompt[k].item() == pytest.approx(1.5 * v.item(), rel=1e-5), k


def test_cpm_terms_scale_with_lambda_and_part_weights(monkeypatch):
    monkeypatch.setattr(criterion_module, "get_uncertain_point_coords_with_randomness", _grid_points)
    model = _build(_cpm_cfg())
    model.train()
    table = torch.randn(6, model.transformer_decoder.hidden_dim, generator=torch.Generator().manual_seed(3))
    _fixed_prompts(model, table)
    batch = [_frame(_sem(boxes=[(1, (2, 30, 2, 36)), (3, (34, 62, 40, 78))]), 4),
             _frame(_sem(boxes=[(2, (10, 40, 20, 60))]), 5)]
    with torch.no_grad():
        torch.manual_seed(0)
        unit = _prompt_losses(model, batch)
        p = model.cpm_loss
        p.loss_lambda, p.acp_weight, p.vcp_weight, p.pcl_weight, p.vcp_class_weight = 2.0, 0.5, 3.0, 0.25, 0.5
        torch.manual_seed(0)
        scaled = _prompt_losses(model, batch)
    # VCP.CLASS_WEIGHT scales only VCP's CE terms (final and per layer)
    factor = {"loss_acp": 1.0, "loss_pcl": 0.5, **{k: 3.0 if k.startswith("loss_vcp_ce") else 6.0 for k in VCP_KEYS}}
    assert set(scaled) == set(factor)
    for k, f in factor.items():
        assert unit[k].item() > 0
        assert scaled[k].item() == pytest.approx(f * unit[k].item(), rel=1e-5), k


# ------------------------------------------------------------------------------------------ (c) statistics
def _bn_buffers(module):
    return {n: b.clone() for n, b in module.named_buffers() if n.split(".")[-1] in
            ("running_mean", "running_var", "num_batches_tracked")}


def test_acp_mixture_leaves_normalisation_statistics_untouched():
    """Audio BatchNorm (as the paper configs): the noise-mixed half of the audio branch's pass must
    not move the running statistics that test time uses on clean audio; the clean half does move
    them, exactly as the baseline's pass does."""
    model = _build(_cpm_cfg(**{"MODEL.AUDIO.NORM": "BN"}))
    model.train()
    batch = [_frame(_sem(boxes=[(1, (2, 30, 2, 36))]), 61), _frame(_sem(boxes=[(2, (10, 40, 20, 60))]), 62)]
    loud = [dict(x, noise_audio=50 * x["noise_audio"]) for x in batch]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _bn_buffers(model)
    assert len(before) > 20  # the audio backbone's BN layers
    with torch.no_grad():
        losses = _prompt_losses(model, batch)
    assert "loss_acp" in losses
    after_quiet = _bn_buffers(model)
    assert any(not torch.equal(before[n], after_quiet[n]) for n in before)
    model.load_state_dict(state)
    with torch.no_grad():
        _prompt_losses(model, loud)  # another mixture, the same clean half
    for n, b in _bn_buffers(model).items():
        assert torch.equal(after_quiet[n], b), n

    # a whole training step (then backward): the statistics move exactly as the clean pass alone
    # moves them, and the backward through both halves runs
    reference = _build(_cpm_cfg(**{"MODEL.AUDIO.NORM": "BN", "MODEL.CPM.ENABLED": "False"}))
    model.load_state_dict(state)
    reference.load_state_dict(model.state_dict(), strict=False)
    reference.train()
    start = _bn_buffers(model)
    sum(model(batch).values()).backward()
    reference(batch)
    after_step, expected = _bn_buffers(model), _bn_buffers(reference)
    assert any(not torch.equal(start[n], after_step[n]) for n in start)
    for n in expected:
        assert torch.allclose(after_step[n].float(), expected[n].float(), atol=1e-6), n


# ------------------------------------------------------------------------------------------ (d) inference
def test_inference_is_the_class_agnostic_path():
    cpm_cfg = _cpm_cfg()
    cpm = _build(cpm_cfg, seed=0)
    cpm.train()
    cpm([_frame(_sem(boxes=[(1, (2, 30, 2, 36))]), 1), _frame(_sem(boxes=[(2, (10, 40, 20, 60))]), 2)])
    base_cfg = cpm_cfg.clone()
    base_cfg.MODEL.CPM.ENABLED = False
    base = _build(base_cfg, seed=1)
    assert base.cpm_loss is None and cpm.cpm_loss is not None
    state = cpm.state_dict()
    # CPM adds only its training-time PCL projection heads to the model's state
    assert set(state) - set(base.state_dict()) == {k for k in state if k.startswith("cpm_loss.pcl_")}
    assert set(base.state_dict()) <= set(state)
    base.load_state_dict({k: v for k, v in state.items() if not k.startswith("cpm_loss.")})

    def forbidden(*args, **kwargs):
        raise AssertionError("CPM prompting ran at inference")

    cpm.prompt_pass.forward = forbidden
    cpm.decode_groups = forbidden
    cpm.eval()
    base.eval()
    items = [_frame(_sem(48, 64), 8), _frame(_sem(40, 56, boxes=[(3, (5, 20, 5, 30))]), 9, noise=None)]
    with torch.no_grad():
        a, b = cpm(items), base(items)
    for x, y in zip(a, b):
        assert torch.equal(x["sem_seg"], y["sem_seg"]) and torch.equal(x["audio_class_probs"], y["audio_class_probs"])


def test_baseline_does_not_import_cpm_training_code():
    """MODEL.CPM.ENABLED False: building and training the model never imports cpm_d2.modeling.cpm."""
    import subprocess
    import sys

    code = (
        "import sys, torch, cpm_d2\n"
        "from cpm_d2.config import setup_cfg\n"
        "from detectron2.modeling import build_model\n"
        f"m = build_model(setup_cfg({str(TINY)!r}, ['MODEL.DEVICE', 'cpu']))\n"
        "assert 'cpm_d2.modeling.cpm' not in sys.modules, 'imported at build'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ------------------------------------------------------------------------------------------ (e) ACP
def _block_mean(x, t=4, f=4):
    """(T, F) numpy -> block averages over t x f cells (area resize to (T/t, F/f))."""
    T, F_ = x.shape
    return x.reshape(T // t, t, F_ // f, f).mean((1, 3))


def test_acp_target_and_loss_are_wired(monkeypatch):
    lam, w = 2.0, 1.5
    model = _build(_cpm_cfg(**{"MODEL.CPM.LAMBDA": str(lam), "MODEL.CPM.ACP.WEIGHT": str(w),
                               "MODEL.CPM.VCP.ENABLED": "False", "MODEL.CPM.PCL.ENABLED": "False"}))
    model.train()
    table = torch.randn(6, model.transformer_decoder.hidden_dim, generator=torch.Generator().manual_seed(11))
    _fixed_prompts(model, table)
    batch = [_frame(_sem(boxes=[(1, (2, 30, 2, 36)), (3, (34, 62, 40, 78))]), 21),
             _frame(_sem(boxes=[(2, (10, 40, 20, 60))]), 22, noise="zero"),
             _frame(_sem(), 23)]  # background only: no prompt, no ACP term
    batch[1]["audio"][0, 8:16, 4:12] = 0.0  # silent 2x2 cells of the 8x6 mask grid
    seen = {}
    real_target = cpm_loss_module.acp_ratio_target

    def spy(clean, noise, size, **kwargs):
        seen["target"] = real_target(clean, noise, size)
        return seen["target"]

    monkeypatch.setattr(cpm_loss_module, "acp_ratio_target", spy)
    losses = model(batch)

    # target by hand (numpy): block means of a_i over block means of a_i + a_j; 0/0 -> 0
    targets = []
    for x in batch:
        clean = x["audio"][0].numpy().astype(np.float64)
        mix = clean + x["noise_audio"][0].numpy()
        cb, mb = _block_mean(clean), _block_mean(mix)
        targets.append(np.where(mb > 0, cb / np.where(mb > 0, mb, 1), 0.0))
    targets = np.stack(targets)
    assert np.allclose(seen["target"].numpy(), targets, atol=1e-6)
    # noise_audio = 0: the target is 1 wherever audio > 0 and 0 in the silent cells
    silent = np.zeros((8, 6), dtype=bool)
    silent[2:4, 1:3] = True
    assert np.array_equal(seen["target"][1].numpy(), np.where(silent, 0.0, 1.0))

    # loss by hand from an independent decode of the mixture with the same prompts
    with torch.no_grad():
        images = model.preprocess_image(batch)
        visual = model.encode_visual(images.tensor)
        mix = torch.stack([x["audio"] + x["noise_audio"] for x in batch])
        audio = model.encode_audio(torch.log(mix + LOG_OFFSET))
        q = torch.zeros(3, 2, table.shape[1])
        q[0] = table[[1, 3]]
        q[1, 0] = table[2]
        pad = torch.tensor([[False, False], [False, True], [True, True]])
        out = model.decode(visual, audio, queries=q, query_padding_mask=pad, audio_masks=True)
        logits = out["pred_audio_masks"].double().numpy()
    per_image = []
    for i, n in enumerate((2, 1)):
        s = 1 / (1 + np.exp(-logits[i, :n].sum(0)))
        per_image.append(((s - targets[i]) ** 2).mean())
    assert losses["loss_acp"].item() == pytest.approx(lam * w * np.mean(per_image), rel=1e-4)


def test_noise_falls_back_to_the_batchs_other_audio():
    model = _build(_cpm_cfg(**{"MODEL.CPM.VCP.ENABLED": "False", "MODEL.CPM.PCL.ENABLED": "False"}))
    model.train()
    _fixed_prompts(model, torch.randn(6, model.transformer_decoder.hidden_dim))
    batch = [_frame(_sem(boxes=[(1, (2, 30, 2, 36))]), 31, noise=None),
             _frame(_sem(boxes=[(2, (10, 40, 20, 60))]), 32, noise=None)]
    with_noise = [dict(batch[0], noise_audio=batch[1]["audio"]), dict(batch[1], noise_audio=batch[0]["audio"])]
    with torch.no_grad():
        rolled = _prompt_losses(model, batch)["loss_acp"]
        explicit = _prompt_losses(model, with_noise)["loss_acp"]
    assert rolled.item() == pytest.approx(explicit.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"frame_31\.jpg.*noise_audio"):
        model(batch[:1])
    with pytest.raises(ValueError, match=r"frame_32\.jpg.*all or none"):
        model([with_noise[0], batch[1]])


@pytest.mark.parametrize("vcp_audio", ["mixture", "clean"])
def test_vcp_audio_selects_the_audio_the_vcp_prompts_hear(monkeypatch, vcp_audio):
    """VCP.AUDIO "clean": VCP's losses are those of the prompts decoded on the clean audio (as with ACP
    off), whatever the noise; ACP's loss still sees the mixture. "mixture": VCP changes with the noise."""
    monkeypatch.setattr(criterion_module, "get_uncertain_point_coords_with_randomness", _grid_points)
    model = _build(_cpm_cfg(**{"MODEL.CPM.PCL.ENABLED": "False", "MODEL.CPM.VCP.AUDIO": vcp_audio}))
    model.train()
    assert model.prompt_pass.vcp_group == (vcp_audio == "clean")
    _fixed_prompts(model, torch.randn(6, model.transformer_decoder.hidden_dim, generator=torch.Generator().manual_seed(3)))
    sem = _sem(boxes=[(1, (2, 30, 2, 36)), (3, (10, 50, 44, 78))])
    quiet, loud = [_frame(sem, 41, noise="zero")], [_frame(sem, 41, noise="random")]
    loud[0]["noise_audio"] = loud[0]["noise_audio"] * 50  # a mixture the noise dominates
    with torch.no_grad():
        with_quiet, with_loud = _prompt_losses(model, quiet), _prompt_losses(model, loud)
        model.cpm_loss.acp_enabled = model.prompt_pass.acp = False  # the prompts hear the clean audio only
        acp_off = _prompt_losses(model, loud)
    assert abs(with_loud["loss_acp"].item() - with_quiet["loss_acp"].item()) > 1e-4
    moved = max(abs(with_loud[k].item() - with_quiet[k].item()) for k in VCP_KEYS)
    if vcp_audio == "clean":
        for k in VCP_KEYS:
            assert with_loud[k].item() == pytest.approx(acp_off[k].item(), rel=1e-6, abs=1e-8), k
        assert moved == 0.0
    else:
        assert moved > 1e-4


def test_vcp_audio_rejects_unknown_values():
    with pytest.raises(ValueError, match=r"MODEL\.CPM\.VCP\.AUDIO"):
        build_model(_cpm_cfg(**{"MODEL.CPM.VCP.AUDIO": "noisy"}))


# ------------------------------------------------------------------------------------------ (f) training
COLORS = torch.tensor([[0, 0, 0], [230, 40, 40], [40, 230, 40], [40, 40, 230]], dtype=torch.float)


def _synthetic_frame(objects, sounding, seed, h=64, w=80):
    """Coloured squares (class colour), only ``sounding`` ones labelled; each sounding class adds
    energy in its own frequency band; the noise occupies a band no class uses."""
    g = torch.Generator().manual_seed(seed)
    img = 30 + 10 * torch.rand(3, h, w, generator=g)
    sem = torch.zeros(h, w, dtype=torch.long)
    mag = 0.01 * torch.rand(1, T_AUDIO, F_AUDIO, generator=g)
    for c, (y0, x0) in objects:
        img[:, y0:y0 + h // 3, x0:x0 + w // 3] = COLORS[c][:, None, None]
        if c in sounding:
            sem[y0:y0 + h // 3, x0:x0 + w // 3] = c
            mag[0, :, 6 * (c - 1):6 * c] += 1.0 + 0.2 * torch.rand(T_AUDIO, 6, generator=g)
    noise = 0.01 * torch.rand(1, T_AUDIO, F_AUDIO, generator=g)
    noise[0, :, 18:] += 1.0
    d = _frame(sem, seed)
    d.update(image=img.to(torch.uint8), audio=mag, noise_audio=noise)
    return d


def test_short_cpm_training_run_lowers_the_loss_and_updates_the_gmm():
    model = _build(_cpm_cfg(num_classes=4), prompts_ready=False)
    model.train()
    gmm = model.class_predictor.mixtures
    means0, cov0 = gmm.means.clone(), gmm.covariances.clone()
    batch = [_synthetic_frame([(1, (4, 4)), (2, (32, 40))], {1}, 0),
             _synthetic_frame([(1, (4, 40)), (2, (32, 4))], {2}, 1),
             _synthetic_frame([(2, (4, 4)), (3, (32, 40))], {2, 3}, 2),
             _synthetic_frame([(3, (4, 40)), (1, (32, 4))], {1}, 3)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(30):
        losses = model(batch)
        assert {"loss_acp", "loss_pcl"} | VCP_KEYS <= set(losses)
        for k, v in losses.items():
            assert torch.isfinite(v), k
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert np.mean(totals[-5:]) < 0.8 * np.mean(totals[:5]), totals
    # memory banks of the classes 0..3 filled ("no object", 4, is scored by the objectness logit and
    # has no bank) and EM ran (UPDATE_INTERVAL 1: every iteration)
    assert (gmm.bank_count[:4] > 0).all() and int(gmm.bank_count.max()) == gmm.memory_size
    assert int(gmm.bank_count[4]) == 0
    assert gmm.initialized[:4].all() and not gmm.initialized[4]
    assert ((gmm.means - means0).abs().flatten(1).amax(1)[:4] > 1e-3).all()
    assert not torch.allclose(gmm.covariances, cov0)
    assert int(model._iter) == 30
    # entries are stamped with their iteration: every image has background (class 0), and with
    # OBSERVE_LAYERS "all" each of the 4 predictions adds it: 16 per step; its MEMORY_SIZE slots
    # hold the last MEMORY_SIZE / 16 iterations -> at 30 the ages are 1..n (16 each), mean (n + 1) / 2
    n = gmm.memory_size // 16
    assert n >= 2
    assert gmm.bank_age(30)[0].item() == pytest.approx((n + 1) / 2)


@pytest.mark.parametrize("head", ["GMMClassPredictor", "LinearClassPredictor"])
def test_classes_are_prompted_only_once_their_mixture_is_fitted(head):
    """A class whose mixture has not been fitted yet (its bank holds too few distinct entries) is not
    prompted: the prompt pass leaves it out, and its losses are those of an image without prompts."""
    model = _build(_cpm_cfg(**{"MODEL.MASK_FORMER.CLASS_PREDICTOR": head, "MODEL.CPM.LINEAR_HEAD_PROMPTS": "gmm"}),
                   prompts_ready=False)
    pp, labels = model.prompt_pass, [torch.tensor([0, 1, 2]), torch.tensor([0, 2])]
    assert [t.tolist() for t in pp.prompt_labels(labels, pp.promptable(model.class_predictor))] == [[], []]
    model.class_predictor.mixtures.initialized[2] = True
    assert [t.tolist() for t in pp.prompt_labels(labels, pp.promptable(model.class_predictor))] == [[2], [2]]
    model.train()
    losses = model([_frame(_sem(boxes=[(1, (2, 30, 2, 36))]), 93), _frame(_sem(boxes=[(3, (10, 40, 20, 60))]), 94)])
    assert all(v.item() == 0 for v in _cpm_part(losses).values())  # classes 1 and 3 are not fitted


def test_softmax_head_with_gmm_prompts():
    """LINEAR_HEAD_PROMPTS "gmm": the softmax classifies, prompts are drawn from per-class mixtures
    fitted by EM to the matched embeddings ("no object" never banked nor prompted)."""
    model = _build(_cpm_cfg(**{"MODEL.MASK_FORMER.CLASS_PREDICTOR": "LinearClassPredictor",
                               "MODEL.CPM.LINEAR_HEAD_PROMPTS": "gmm"}))
    head = model.class_predictor
    assert head.can_sample and head.prompt_gmm is not None and not hasattr(head, "prompts")
    assert not list(head.prompt_gmm.parameters())  # never run forward: nothing for a loss to train
    model.train()
    batch = [_frame(_sem(boxes=[(1, (2, 30, 2, 36))]), 91), _frame(_sem(boxes=[(2, (10, 40, 20, 60))]), 92)]
    for _ in range(3):
        losses = model(batch)
    assert set(losses) >= VCP_KEYS | {"loss_acp", "loss_pcl"}
    gmm = head.prompt_gmm
    assert gmm.bank_count[:3].tolist() != [0, 0, 0] and int(gmm.bank_count[5]) == 0
    assert gmm.initialized[:3].all()  # EM every iteration (cpm_r18_tiny)
    torch.manual_seed(0)
    z = head.sample(torch.tensor([1, 2]))
    torch.manual_seed(0)
    assert torch.equal(z, gmm.sample(torch.tensor([1, 2])))
    assert set(model.state_dict()) >= {"transformer_decoder.class_predictor.prompt_gmm.means",
                                       "transformer_decoder.class_predictor.linear.weight"}
    with pytest.raises(ValueError, match=r"prompts \(MODEL.CPM.LINEAR_HEAD_PROMPTS\) must be none \| embedding \| fixed_random \| gmm, got .points."):
        _build(_cpm_cfg(**{"MODEL.MASK_FORMER.CLASS_PREDICTOR": "LinearClassPredictor",
                           "MODEL.CPM.LINEAR_HEAD_PROMPTS": "points"}))


def test_softmax_head_with_fixed_random_prompts_keeps_them_through_training():
    """LINEAR_HEAD_PROMPTS "fixed_random": one random code per class, a checkpointed buffer the
    prompting losses cannot change."""
    model = _build(_cpm_cfg(**{"MODEL.MASK_FORMER.CLASS_PREDICTOR": "LinearClassPredictor",
                               "MODEL.CPM.LINEAR_HEAD_PROMPTS": "fixed_random"}))
    head = model.class_predictor
    codes = head.fixed_prompts.clone()
    assert head.can_sample and not hasattr(head, "prompts") and not codes.requires_grad
    assert "transformer_decoder.class_predictor.fixed_prompts" in model.state_dict()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = [_frame(_sem(boxes=[(1, (2, 30, 2, 36))]), 91), _frame(_sem(boxes=[(2, (10, 40, 20, 60))]), 92)]
    for _ in range(2):
        losses = model(batch)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert set(losses) >= VCP_KEYS | {"loss_acp", "loss_pcl"} and losses["loss_vcp_ce"] > 0
    assert torch.equal(head.fixed_prompts, codes)
    assert torch.equal(head.sample(torch.tensor([2, 1, 2])), codes[[2, 1, 2]])


def test_observe_all_layers_feeds_every_prediction_to_the_bank():
    """OBSERVE_LAYERS "all": each prediction's matched embeddings (1 audio + 3 visual layers of the
    tiny model) enter the bank, with the labels of that prediction's own matching and the index of
    their query as source (so the copies of one query count once); OBSERVE_CORRECT_ONLY keeps only
    the embeddings whose prediction (argmax) is their label."""
    counts = {}
    batch = [_frame(_sem(boxes=[(1, (2, 30, 2, 36))]), 81), _frame(_sem(boxes=[(2, (10, 40, 20, 60))]), 82)]
    for mode, correct in (("last", False), ("all", False), ("all", True)):
        model = _build(_cpm_cfg(**{"MODEL.MASK_FORMER.GMM.OBSERVE_LAYERS": mode, "MODEL.MASK_FORMER.GMM.MEMORY_SIZE": "512",
                                   "MODEL.MASK_FORMER.GMM.OBSERVE_CORRECT_ONLY": str(correct)}))
        model.train()
        seen, logits = [], []
        real = model.class_predictor.observe
        model.class_predictor.observe = lambda e, l, it, src, *rest: (seen.append((e.clone(), l.clone(), src.clone())),
                                                                       real(e, l, it, src, *rest))[1]
        real_head = model.class_predictor.forward
        model.class_predictor.forward = lambda e: (lambda out: (logits.append((e.detach().clone(), out.detach())), out)[1])(
            real_head(e))
        model(batch)
        emb, lab, src = seen[0]
        counts[mode, correct] = lab.numel()
        if correct:
            # every banked embedding is one the head classified as its label
            table = {tuple(e.tolist()): o.argmax(-1).item() for es, os in logits for e, o in
                     zip(es.reshape(-1, es.shape[-1]), os.reshape(-1, os.shape[-1]))}
            assert all(table[tuple(e.tolist())] == l for e, l in zip(emb, lab.tolist()))
            continue
        # per prediction: every target matched once (2 per image: background + one class), rest no-object
        per_pred = lab.view(-1, 2 * 10)
        assert ((per_pred < 5).sum(1) == 4).all() and (per_pred == 5).sum().item() == per_pred.shape[0] * 16
        assert src.view(-1, 2 * 10).tolist() == [list(range(20))] * per_pred.shape[0]  # query i of the batch
    assert counts["last", False] == 2 * 10 and counts["all", False] == 4 * 2 * 10
    assert counts["all", True] < counts["all", False]
    with pytest.raises(ValueError, match="OBSERVE_LAYERS"):
        _build(_cpm_cfg(**{"MODEL.MASK_FORMER.GMM.OBSERVE_LAYERS": "some"}))


def test_observe_prompts_banks_the_prompts_embeddings_with_their_classes():
    """OBSERVE_PROMPTS: besides the matched queries' rows (2 images x 10 queries per prediction),
    the bank receives each prediction's embedding of every VCP prompt, labelled with the prompt's
    class, its copies over the 4 predictions sharing one source that no query has; off, and
    without CPM, as before."""
    batch = [_frame(_sem(boxes=[(1, (2, 30, 2, 36)), (3, (40, 60, 50, 70))]), 81),
             _frame(_sem(boxes=[(2, (10, 40, 20, 60))]), 82)]
    seen = {}
    for on in (False, True):
        model = _build(_cpm_cfg(**{"MODEL.MASK_FORMER.GMM.OBSERVE_PROMPTS": str(on),
                                   "MODEL.MASK_FORMER.GMM.MEMORY_SIZE": "512"}))
        model.train()
        banked, passes = [], []
        real = model.class_predictor.observe
        model.class_predictor.observe = lambda e, l, it, src, whose: (banked.append((e.clone(), l.clone(), src.clone(),
                                                                                      whose.clone())),
                                                                       real(e, l, it, src, whose))[1]
        real_pass = model.prompt_pass.forward
        model.prompt_pass.forward = lambda *a: (lambda out: (passes.append(out[1]), out)[1])(real_pass(*a))
        model(batch)
        seen[on] = (banked[0], passes[0])
    (emb0, lab0, src0, whose0), _ = seen[False]
    (emb, lab, src, whose), prompts = seen[True]
    n = emb0.shape[0]
    assert n == 4 * 2 * 10 and torch.equal(lab[:n], lab0) and torch.equal(src[:n], src0)
    assert prompts.host_labels.tolist() == [1, 3, 2]  # the classes in view, per image
    extra_emb, extra_lab, extra_src, extra_whose = emb[n:], lab[n:], src[n:], whose[n:]
    assert extra_lab.tolist() == [1, 3, 2] * 4 and (extra_src - PROMPT_SOURCE).tolist() == [0, 1, 2] * 4
    assert sorted(extra_whose.tolist()) == sorted(whose0.unique().tolist() * 3)
    out = prompts.vcp_outputs
    final, aux = whose0[0].item(), out["aux_outputs"]
    for k, p in enumerate(extra_whose[::3].tolist()):
        pred = out if p == final else aux[p]
        expected = pred["query_embeddings"][prompts.image_index, prompts.slot_index]
        assert torch.allclose(extra_emb[3 * k:3 * k + 3], expected)
    with pytest.raises(ValueError, match="OBSERVE_PROMPTS .* needs MODEL.CPM.ENABLED"):
        _build(_cpm_cfg(**{"MODEL.MASK_FORMER.GMM.OBSERVE_PROMPTS": "True", "MODEL.CPM.ENABLED": "False"}))


def test_per_prediction_mixtures_are_fed_and_asked_by_their_own_prediction():
    """PER_PREDICTION: the tiny model's 4 predictions (1 audio + 3 visual layers) each bank their own
    matched embeddings in their own set of mixtures (the final one in ``mixtures``), and each
    prediction's class logits come from its own set (one head call per prediction)."""
    batch = [_frame(_sem(boxes=[(1, (2, 30, 2, 36))]), 81), _frame(_sem(boxes=[(2, (10, 40, 20, 60))]), 82)]
    model = _build(_cpm_cfg(**{"MODEL.MASK_FORMER.GMM.PER_PREDICTION": "True", "MODEL.MASK_FORMER.GMM.MEMORY_SIZE": "512"}))
    head = model.class_predictor
    assert head.num_predictions == 4 and len(head.aux_mixtures) == 3
    for m in head.aux_mixtures:
        m.initialized.fill_(True)
    model.train()
    asked, banked = [], []
    real_head = head.forward
    head.forward = lambda e, prediction=None: (asked.append(prediction), real_head(e, prediction))[1]
    real_observe = head.observe
    head.observe = lambda e, l, it, src, whose: (banked.append((e.clone(), whose.clone())),
                                                 real_observe(e, l, it, src, whose))[1]
    model(batch)
    assert sorted(set(asked)) == [0, 1, 2, 3]  # every prediction scored by its own set
    emb, whose = banked[0]
    assert torch.bincount(whose).tolist() == [20, 20, 20, 20]  # 2 images x 10 queries per prediction
    for i in range(4):
        # each set's bank holds exactly its prediction's matched (non no-object) embeddings
        m = head.mixtures_of(i)
        got = m.bank[:5][torch.arange(m.memory_size)[None, :] < m.bank_count[:5, None]]
        assert got.shape[0] == 4  # background + one class in each of the 2 images
        rows = m.prepare(emb[whose == i])  # the bank holds the modelled (normalised) embeddings
        assert all(any(torch.allclose(g, r, atol=1e-6) for r in rows) for g in got)
        others = m.prepare(emb[whose != i])
        assert not any(any(torch.allclose(g, r, atol=1e-6) for r in others) for g in got)
    with pytest.raises(ValueError, match="PER_PREDICTION needs OBSERVE_LAYERS 'all'"):
        _build(_cpm_cfg(**{"MODEL.MASK_FORMER.GMM.PER_PREDICTION": "True", "MODEL.MASK_FORMER.GMM.OBSERVE_LAYERS": "last"}))


def test_bank_that_cannot_reach_the_first_fit_is_refused():
    with pytest.raises(ValueError, match="MEMORY_SIZE 32 holds only 8 distinct queries.*OBSERVE_LAYERS 'last'"):
        _build(_cpm_cfg(**{"MODEL.MASK_FORMER.GMM.MEMORY_SIZE": "32", "MODEL.MASK_FORMER.GMM.MIN_ENTRIES_PER_COMPONENT": "4"}))
    _build(_cpm_cfg(**{"MODEL.MASK_FORMER.GMM.MEMORY_SIZE": "32", "MODEL.MASK_FORMER.GMM.MIN_ENTRIES_PER_COMPONENT": "4",
                       "MODEL.MASK_FORMER.GMM.OBSERVE_LAYERS": "last"}))


def test_point_prompts_are_learned_through_the_prompt_losses():
    """Table 5's "Point Rep.": the softmax head's (C+1) x D prompt embedding is trained by VCP/ACP/PCL."""
    model = _build(_cpm_cfg(**{"MODEL.MASK_FORMER.CLASS_PREDICTOR": "LinearClassPredictor"}))
    model.train()
    batch = [_frame(_sem(boxes=[(1, (2, 30, 2, 36)), (3, (34, 62, 40, 78))]), 71),
             _frame(_sem(boxes=[(3, (10, 40, 20, 60))]), 72)]
    losses = model(batch)
    sum(_cpm_part(losses).values()).backward()
    grad = model.class_predictor.prompts.weight.grad
    norms = grad.norm(dim=1)
    assert norms[1] > 0 and norms[3] > 0  # the prompted classes
    assert norms[0] == 0 and norms[2] == 0 and norms[4] == 0 and norms[5] == 0  # never prompted


# ------------------------------------------------------------------------------------------ (g) empty
def test_batch_without_sounding_classes_gives_zero_cpm_losses_in_the_graph():
    model = _build(_cpm_cfg())
    model.train()
    full = model([_frame(_sem(boxes=[(1, (2, 30, 2, 36))]), 41), _frame(_sem(boxes=[(2, (10, 40, 20, 60))]), 42)])
    model.zero_grad()
    empty = model([_frame(_sem(), 43), _frame(torch.full((64, 80), 255, dtype=torch.long), 44)])
    assert set(empty) == set(full)
    cpm = _cpm_part(empty)
    assert set(cpm) == {"loss_acp", "loss_pcl"} | VCP_KEYS
    for k, v in cpm.items():
        assert v.item() == 0 and v.requires_grad, k
    sum(cpm.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    # the prompted decode is part of the graph: decoder and audio encoder receive (zero) gradients
    for prefix in ("transformer_decoder.audio_mask_embed", "transformer_decoder.mask_embed", "audio_backbone."):
        assert any(n.startswith(prefix) and g is not None for n, g in grads.items()), prefix
    assert all(g is None or (torch.isfinite(g).all() and g.abs().sum() == 0) for g in grads.values())


# ------------------------------------------------------------------------------------------ (h) checkpoint
def test_checkpoint_round_trip_keeps_the_gmm_state(tmp_path):
    model = _build(_cpm_cfg(**{"MODEL.MASK_FORMER.GMM.UPDATE_INTERVAL": "2", "MODEL.MASK_FORMER.GMM.MIN_ENTRIES_PER_COMPONENT": "1"}), seed=0, prompts_ready=False)
    model.train()
    batch = [_frame(_sem(boxes=[(1, (2, 30, 2, 36)), (3, (34, 62, 40, 78))]), 51),
             _frame(_sem(boxes=[(2, (10, 40, 20, 60))]), 52)]
    for _ in range(2):
        model(batch)  # observe twice, EM at the second iteration
    gmm = model.class_predictor.mixtures
    assert gmm.initialized.any()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("cpm")
    other = _build(_cpm_cfg(**{"MODEL.MASK_FORMER.GMM.UPDATE_INTERVAL": "2", "MODEL.MASK_FORMER.GMM.MIN_ENTRIES_PER_COMPONENT": "1"}), seed=1, prompts_ready=False)
    names = ("weights", "means", "covariances", "initialized", "bank", "bank_count", "bank_ptr", "bank_iter",
             "bank_source", "bank_norm")
    assert not all(torch.equal(getattr(other.class_predictor.mixtures, n), getattr(gmm, n)) for n in names)
    DetectionCheckpointer(other).load(str(tmp_path / "cpm.pth"))
    for n in names:
        assert torch.equal(getattr(other.class_predictor.mixtures, n), getattr(gmm, n)), n
    assert int(other._iter) == 2
    # the restored model draws the same prompts
    lab = torch.tensor([1, 2, 3])
    torch.manual_seed(5)
    z1 = gmm.sample(lab)
    torch.manual_seed(5)
    z2 = other.class_predictor.sample(lab)
    assert torch.equal(z1, z2)


def test_cpm_rejects_a_class_head_that_cannot_sample():
    from cpm_d2.modeling.class_predictor import ClassPredictor

    class SoftmaxOnly(ClassPredictor):  # a head with no class-conditional prompts
        def forward(self, embeddings):
            return embeddings

    with pytest.raises(RuntimeError, match="can_sample is False"):
        SoftmaxOnly().sample(torch.tensor([1]))
    model = _build(_cpm_cfg())
    model.transformer_decoder.class_predictor = SoftmaxOnly()
    with pytest.raises(ValueError, match="samples prompts"):
        type(model)(**{k: getattr(model, k) for k in (
            "backbone", "pixel_decoder", "audio_backbone", "audio_pixel_decoder", "transformer_decoder",
            "criterion", "weight_dict", "num_classes", "num_queries", "size_divisibility")},
            pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0), cpm_loss=model.cpm_loss)


@pytest.mark.parametrize("row, changes", [
    ("x_pcl_batch_negatives", {"MODEL.CPM.PCL.NEGATIVES": ("image", "batch")}),
    ("x_lambda_0.25", {"MODEL.CPM.LAMBDA": (1.0, 0.25)}),
    ("x_vcp_mixture_audio", {"MODEL.CPM.VCP.AUDIO": ("clean", "mixture")}),
    ("x_gmm_raw_embeddings", {"MODEL.MASK_FORMER.GMM.NORMALIZE": (True, False),
                              "MODEL.MASK_FORMER.GMM.EPS": (1e-2, 1e-4)}),
    ("x_gmm_eps_1e-3", {"MODEL.MASK_FORMER.GMM.EPS": (1e-2, 1e-3)}),
    ("x_gmm_eps_3e-2", {"MODEL.MASK_FORMER.GMM.EPS": (1e-2, 3e-2)}),
    ("x_gmm_eps_1e-3_prompt_eps_1e-2", {"MODEL.MASK_FORMER.GMM.EPS": (1e-2, 1e-3),
                                        "MODEL.MASK_FORMER.GMM.PROMPT_EPS": (0.0, 1e-2)}),
    ("x_gmm_eps_1e-3_score_eps_1e-2", {"MODEL.MASK_FORMER.GMM.EPS": (1e-2, 1e-3),
                                       "MODEL.MASK_FORMER.GMM.SCORE_EPS": (0.0, 1e-2)}),
    ("x_gmm_class_relative_floor", {"MODEL.MASK_FORMER.GMM.EPS": (1e-2, 1e-4),
                                    "MODEL.MASK_FORMER.GMM.EPS_CLASS_RELATIVE": (0.0, 0.25),
                                    "MODEL.MASK_FORMER.GMM.SCORE_EPS": (0.0, 1e-2)}),
    ("x_gmm_sinkhorn", {"MODEL.MASK_FORMER.GMM.ESTEP": ("posterior", "sinkhorn")}),
    ("x_gmm_no_object_softmax", {"MODEL.MASK_FORMER.GMM.NO_OBJECT": ("objectness", "softmax")}),
    ("x_gmm_prompt_scale_0", {"MODEL.MASK_FORMER.GMM.PROMPT_SCALE": (1.0, 0.0)}),
    ("x_gmm_prompt_scale_0.5", {"MODEL.MASK_FORMER.GMM.PROMPT_SCALE": (1.0, 0.5)}),
    ("x_gmm_prompt_adapter_linear", {"MODEL.MASK_FORMER.GMM.PROMPT_ADAPTER": ("none", "linear")}),
    ("x_gmm_prompt_class_offset", {"MODEL.MASK_FORMER.GMM.PROMPT_ADAPTER": ("none", "class_offset")}),
    ("x_gmm_head_point_prompts", {"MODEL.CPM.GMM_HEAD_PROMPTS": ("gmm", "embedding")}),
    ("x_gmm_observe_prompts", {"MODEL.MASK_FORMER.GMM.OBSERVE_PROMPTS": (False, True)}),
    ("x_gmm_head_point_prompts_observe_prompts", {"MODEL.CPM.GMM_HEAD_PROMPTS": ("gmm", "embedding"),
                                                  "MODEL.MASK_FORMER.GMM.OBSERVE_PROMPTS": (False, True)}),
    ("x_softmax_fixed_random_prompts", {"MODEL.MASK_FORMER.CLASS_PREDICTOR": ("GMMClassPredictor",
                                                                        "LinearClassPredictor"),
                                        "MODEL.CPM.LINEAR_HEAD_PROMPTS": ("embedding", "fixed_random")}),
    ("x_gmm_prompt_class_offset_scale_0.5", {"MODEL.MASK_FORMER.GMM.PROMPT_ADAPTER": ("none", "class_offset"),
                                             "MODEL.MASK_FORMER.GMM.PROMPT_SCALE": (1.0, 0.5)}),
    ("x_gmm_per_prediction", {"MODEL.MASK_FORMER.GMM.PER_PREDICTION": (False, True)}),
    ("x_gmm_learned_mean_offsets", {"MODEL.MASK_FORMER.GMM.LEARNED_MEAN_OFFSETS": (False, True)}),
    ("x_gmm_gmmseg_scoring", {"MODEL.MASK_FORMER.GMM.COMPONENT_SCORE": ("logsumexp", "max"),
                              "MODEL.MASK_FORMER.GMM.LOGIT_NORM": ("sqrt_dim", "class_layer_norm")}),
])
def test_beyond_the_paper_rows_differ_from_full_cpm_only_in_their_keys(row, changes):
    full, cfg = _load(ABLATIONS / "t4_6_cpm_full.yaml"), _load(ABLATIONS / f"{row}.yaml")
    cfg.defrost()
    for key, (full_value, row_value) in changes.items():
        *path, leaf = key.split(".")
        node_full, node_row = full, cfg
        for name in path:
            node_full, node_row = node_full[name], node_row[name]
        assert (node_full[leaf], node_row[leaf]) == (full_value, row_value)
        node_row[leaf] = full_value
    cfg.OUTPUT_DIR = full.OUTPUT_DIR
    assert cfg == full
