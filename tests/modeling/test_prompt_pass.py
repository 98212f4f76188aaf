"""CPM's fused training step (modeling/cpm/prompt_pass.py, the decoder's query groups) against the
unfused computation it replaces: the losses, the gradient of every parameter and the BatchNorm
running statistics of one step equal those of ``separate_decodes_losses`` (the audio encoded twice,
the mixture under frozen statistics; the class-agnostic queries and each prompt group decoded on
their own), with ACP on and off, VCP on the clean audio and on the mixture, the stereo position
on and off, BatchNorm in the audio branch and under 2-process gloo DDP. Also: split-batch
BatchNorm, groups that cannot see each other, a fully padded group, the heads each group asks
for, and bad inputs rejected where they enter the model. Tiny sizes, CPU, dropout 0."""
import copy
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import cpm_d2  # noqa: F401  (compat fixes + registries)
import cpm_d2.modeling.criterion as criterion_module
from cpm_d2 import compat
from cpm_d2.config import get_cfg
from cpm_d2.data.dataset_mapper import instances_from_sem_seg
from cpm_d2.modeling.cpm import PromptBatch, split_batch_norm
from cpm_d2.modeling.transformer_decoder import QueryGroup
from detectron2.modeling import build_model

ROOT = Path(__file__).resolve().parents[2]
CPM_TINY = ROOT / "configs" / "synthetic" / "cpm_r18_tiny.yaml"
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _grid_points(src_masks, *args, **kwargs):
    """Deterministic stand-in for the criterion's random point sampling."""
    ys, xs = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    pts = torch.stack([(xs.flatten() + 0.5) / 16, (ys.flatten() + 0.5) / 16], -1)
    return pts.expand(src_masks.shape[0], -1, -1).to(src_masks)


def _cfg(stereo=False, **overrides):
    cfg = get_cfg()
    cfg.merge_from_file(str(CPM_TINY))
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    cfg.MODEL.CPM.PCL.NUM_PIXELS = 64
    if stereo:
        cfg.MODEL.AUDIO.IN_CHANNELS = cfg.INPUT.AUDIO.CHANNELS = 2
        cfg.MODEL.AUDIO.STEREO_POSITION.ENABLED = True
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    mixtures = getattr(model.class_predictor, "mixtures", None)
    if mixtures is not None:  # every class promptable from the first step
        mixtures.initialized.fill_(True)
    # losses of one step only: the class head's state is not moved by this step's matching
    model.observe_assignments = lambda *args, **kwargs: None
    return model.train()


def _double(model):
    """``model`` in float64, inputs too (the class head and the stereo prior, which compute in their
    own precision, stay in float32), so that two computations equal in exact arithmetic agree far below
    float32's rounding of long sums: a conv weight gradient summed over 2B samples at once or over
    two batches of B differs by ~1e-5 of its size in float32."""
    model.double()
    if model.transformer_decoder.stereo_position is not None:
        model.transformer_decoder.stereo_position.float()
    head = model.class_predictor.float()
    classify, preprocess = head.forward, model.preprocess_audio
    head.forward = lambda embeddings: classify(embeddings.float()).double()
    model.preprocess_audio = lambda *args, **kwargs: preprocess(*args, **kwargs).double()
    return model


def _pair(cfg, double=False):
    """Two identical models: one for the fused step, one for the reference."""
    model = _model(cfg)
    reference = copy.deepcopy(model)
    return (_double(model), _double(reference)) if double else (model, reference)


def _batch(channels=1, seed=0, noise=True, n=3):
    """n frames with 1-2 sounding classes each (one without any), 64x80, audio (channels, 32, 24)."""
    boxes = [[(1, (2, 30, 2, 36)), (3, (34, 62, 40, 78))], [(2, (10, 40, 20, 60))], [], [(4, (5, 25, 5, 25))]]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        sem = torch.zeros(64, 80, dtype=torch.long)
        for c, (y0, y1, x0, x1) in boxes[i % len(boxes)]:
            sem[y0:y1, x0:x1] = c
        d = {"file_name": f"frame_{seed}_{i}.jpg", "image": torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8,
                                                                         generator=g),
             "sem_seg": sem, "instances": instances_from_sem_seg(sem), "height": 64, "width": 80,
             "audio": torch.rand(channels, 32, 24, generator=g) + 0.05}
        if noise:
            d["noise_audio"] = torch.rand(channels, 32, 24, generator=g)
        out.append(d)
    return out


# ------------------------------------------------------------------------------------------ the reference
@contextmanager
def _frozen_norm_statistics(*modules):
    """The unfused step's way of keeping the mixture out of the running statistics: swap them for
    copies during the pass, put the originals back after it."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    swapped = [(sub, n, sub._buffers[n]) for m in modules for sub in m.modules() for n in names
               if sub._buffers.get(n) is not None]
    for sub, n, buf in swapped:
        sub._buffers[n] = buf.detach().clone()
    try:
        yield
    finally:
        for sub, n, buf in swapped:
            sub._buffers[n] = buf


def separate_decodes_losses(model, batch):
    """Reference for the fused step: the computation before the prompts joined the class-agnostic
    queries' decoder pass. The audio branch runs on a_i, then (ACP) on a_i + a_j with frozen
    normalisation statistics; the N queries decode a_i alone; the prompts decode alone, once per
    audio a loss reads (VCP.AUDIO "clean" with ACP: a_i for VCP and a_p for ACP / PCL)."""
    pp, cpm_loss = model.prompt_pass, model.cpm_loss
    images = model.preprocess_image(batch)
    mags = model.preprocess_audio(batch)
    visual = model.encode_visual(images.tensor)
    frame = model.stereo_frame(batch, images) if model.stereo_position else None
    labels = model.target_labels(batch)
    targets = model.prepare_targets(batch, images, labels)
    plan = pp.plan(pp.prompt_labels(labels, pp.promptable(model.class_predictor)), labels, mags.device)
    prompts = pp.sample(model.class_predictor, plan, model.transformer_decoder.hidden_dim, visual[0].dtype)
    pad = ~plan["valid"]
    clean = model.audio_features(mags, frame)
    noise = mixed = None
    if cpm_loss.acp_enabled:
        noise = pp.noise_magnitudes(model, batch, mags)
        with _frozen_norm_statistics(model.audio_backbone, model.audio_pixel_decoder):
            mixed = model.audio_features(mags + noise, frame)
    outputs = model.decode(visual, clean)
    audio_masks = cpm_loss.acp_enabled or cpm_loss.pcl_enabled

    def prompt_decode(audio):
        return model._without_aux(model.decode(visual, audio, queries=prompts, query_padding_mask=pad,
                                               audio_masks=audio_masks))

    heard = mixed if cpm_loss.acp_enabled else clean
    prompted = prompt_decode(heard)
    vcp_outputs = prompted
    if cpm_loss.acp_enabled and cpm_loss.vcp_enabled and cpm_loss.vcp_audio == "clean":
        vcp_outputs = prompt_decode(clean)
    losses, _, num_masks = model.class_agnostic_losses(outputs, targets)
    reference = PromptBatch(labels=plan["labels"], valid=plan["valid"], image_index=plan["image_index"],
                            slot_index=plan["slot_index"], vcp_indices=plan["vcp_indices"], outputs=prompted,
                            vcp_outputs=vcp_outputs, audio_features=heard["feature_map"],
                            clean_audio=mags if cpm_loss.acp_enabled else None, noise_audio=noise)
    losses.update(cpm_loss(reference, targets, num_masks, visual[0]))
    return losses


def _norm_statistics(model):
    return {n: b.clone() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in
            ("running_mean", "running_var", "num_batches_tracked")}


def _step(fn, model, batch, seed):
    """Losses, gradients and normalisation statistics of one step of ``fn(model, batch)``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses = fn(model, batch)
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return {k: v.detach() for k, v in losses.items()}, grads, _norm_statistics(model)


def _compare(fused, reference, grad_rtol=0.0):
    """Losses and gradients within ATOL (gradients also within ``grad_rtol`` of their tensor's
    largest entry), normalisation statistics within float32 rounding."""
    (lf, gf, sf), (lr, gr, sr) = fused, reference
    assert set(lf) == set(lr)
    for k in lr:
        torch.testing.assert_close(lf[k], lr[k], atol=ATOL, rtol=0, msg=k)
    assert set(gf) == set(gr)
    for n in gr:
        assert (gf[n] is None) == (gr[n] is None), n
        if gr[n] is not None:
            scale = float(gr[n].abs().max())
            torch.testing.assert_close(gf[n], gr[n], atol=ATOL + grad_rtol * scale, rtol=0, msg=n)
    assert set(sf) == set(sr)
    for n in sr:
        torch.testing.assert_close(sf[n], sr[n], atol=1e-6, rtol=1e-5, msg=n)


CASES = {
    "acp_vcp_clean": {},
    "acp_vcp_mixture": {"MODEL.CPM.VCP.AUDIO": "mixture"},
    "acp_off": {"MODEL.CPM.ACP.ENABLED": "False"},
    "acp_only": {"MODEL.CPM.VCP.ENABLED": "False", "MODEL.CPM.PCL.ENABLED": "False"},
    "point_prompts_no_deep_supervision": {"MODEL.MASK_FORMER.CLASS_PREDICTOR": "LinearClassPredictor",
                                          "MODEL.MASK_FORMER.DEEP_SUPERVISION": "False"},
    "batchnorm_audio": {"MODEL.AUDIO.NORM": "BN", "MODEL.SEM_SEG_HEAD.NORM": "BN"},
}


# every case mono; the three layouts of the audio (prompts on a_i and a_p, on a_p, on a_i) with stereo too
PARAMS = [(c, False) for c in sorted(CASES)] + [(c, True) for c in ("acp_vcp_clean", "acp_vcp_mixture", "acp_off")]


@pytest.mark.parametrize("case, stereo", PARAMS, ids=[f"{c}-{'stereo' if s else 'mono'}" for c, s in PARAMS])
def test_fused_step_equals_separate_decodes(monkeypatch, case, stereo):
    monkeypatch.setattr(criterion_module, "get_uncertain_point_coords_with_randomness", _grid_points)
    model, reference = _pair(_cfg(stereo, **CASES[case]), double=True)
    batch = _batch(channels=2 if stereo else 1)
    fused = _step(lambda m, b: m(b), model, batch, seed=1)
    unfused = _step(separate_decodes_losses, reference, batch, seed=1)
    _compare(fused, unfused)
    losses, grads, stats = fused
    assert all(torch.isfinite(v) for v in losses.values())
    assert any(k.startswith("loss_acp") or k.startswith("loss_vcp") or k == "loss_pcl" for k in losses)
    if case == "batchnorm_audio":
        start = _norm_statistics(_model(_cfg(stereo, **CASES[case])))
        assert len(start) > 20 and any(not torch.equal(start[n].to(stats[n]), stats[n]) for n in start)  # the clean half moved them
    if case == "point_prompts_no_deep_supervision":
        assert grads["transformer_decoder.class_predictor.prompts.weight"].abs().sum() > 0


def test_fused_step_in_float32_equals_separate_decodes_up_to_rounding(monkeypatch):
    """The model's own dtype: losses within ATOL, gradients within 1e-4 of their largest entry
    (float32 rounding of the audio branch's sums over 2B samples instead of two times B)."""
    monkeypatch.setattr(criterion_module, "get_uncertain_point_coords_with_randomness", _grid_points)
    model, reference = _pair(_cfg(**CASES["batchnorm_audio"]))
    batch = _batch()
    _compare(_step(lambda m, b: m(b), model, batch, seed=1), _step(separate_decodes_losses, reference, batch, seed=1),
             grad_rtol=1e-4)


def test_batchnorm_statistics_follow_the_clean_half_only():
    """A training step with BatchNorm moves the running statistics exactly as the baseline's clean
    pass does (the mixture never touches them)."""
    cfg = _cfg(**CASES["batchnorm_audio"])
    model = _model(cfg)
    base_cfg = cfg.clone()
    base_cfg.MODEL.CPM.ENABLED = False
    base = build_model(base_cfg).train()
    base.load_state_dict(model.state_dict(), strict=False)
    batch = _batch()
    model(batch)
    base(batch)
    ours, theirs = _norm_statistics(model), _norm_statistics(base)
    assert set(ours) == set(theirs)
    for n in theirs:
        torch.testing.assert_close(ours[n], theirs[n], atol=1e-6, rtol=1e-5, msg=n)


def test_split_batch_norm_is_two_passes_with_the_second_frozen():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.GroupNorm(2, 4),
                              torch.nn.BatchNorm2d(4, momentum=None))
    ref = copy.deepcopy(net)
    net.train()
    ref.train()
    clean, other = torch.randn(3, 1, 6, 6), 5 + 3 * torch.randn(2, 1, 6, 6)
    with split_batch_norm(net, clean=3):
        y = net(torch.cat([clean, other]))
    y_clean = ref(clean)
    with _frozen_norm_statistics(ref):
        y_other = ref(other)
    torch.testing.assert_close(y, torch.cat([y_clean, y_other]), atol=1e-5, rtol=1e-5)
    for (n, a), (_, b) in zip(net.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, msg=n)
    assert int(net[1].num_batches_tracked) == 1
    assert "forward" not in vars(net[1]) and net[1].track_running_stats  # the layers are themselves again
    # eval mode: running statistics, the whole batch at once
    net.eval()
    with split_batch_norm(net, clean=3):
        z = net(torch.cat([clean, other]))
    torch.testing.assert_close(z, net(torch.cat([clean, other])))


# ------------------------------------------------------------------------------------------ the groups
def _decoder_inputs(model, batch):
    images = model.preprocess_image(batch)
    visual = model.encode_visual(images.tensor)
    audio = model.audio_features(model.preprocess_audio(batch))
    return visual, audio


def test_groups_do_not_see_each_other_and_a_fully_padded_group_gives_no_nan():
    model = _model(_cfg()).eval()
    batch = _batch(noise=False, n=2)
    d = model.transformer_decoder.hidden_dim
    with torch.no_grad():
        visual, audio = _decoder_inputs(model, batch)
        other = {k: v.flip(0) for k, v in audio.items()}  # a second audio: the batch's clips swapped
        q = torch.randn(2, 3, d)
        pad = torch.tensor([[True, True, True], [False, True, False]])  # image 0: the whole group is padding
        groups = [QueryGroup(), QueryGroup(q, padding_mask=pad, audio=1, audio_masks="final")]
        fused = model.decode_groups(visual, [audio, other], groups)
        alone = [model.decode(visual, audio), model.decode(visual, other, queries=q, query_padding_mask=pad,
                                                           audio_masks=True)]
        # changing one group's queries changes nothing in the other group
        q2 = q + 10 * torch.randn_like(q)
        moved = model.decode_groups(visual, [audio, other], [groups[0], QueryGroup(q2, padding_mask=pad, audio=1)])
    for out in fused:
        assert all(torch.isfinite(v).all() for k, v in out.items() if isinstance(v, torch.Tensor))
    for k in ("pred_logits", "pred_masks", "audio_pred_logits", "query_embeddings"):
        torch.testing.assert_close(fused[0][k], alone[0][k], atol=1e-5, rtol=1e-5, msg=k)
        torch.testing.assert_close(moved[0][k], fused[0][k], atol=1e-5, rtol=1e-5, msg=k)
    for k in ("pred_logits", "pred_masks", "pred_audio_masks"):
        torch.testing.assert_close(fused[1][k], alone[1][k], atol=1e-5, rtol=1e-5, msg=k)
    assert torch.equal(fused[1]["query_padding_mask"], pad)


def test_each_group_gets_only_the_heads_it_asks_for():
    model = _model(_cfg())
    batch = _batch(noise=False, n=2)
    calls = []
    head = model.class_predictor.forward
    model.class_predictor.forward = lambda e: calls.append(tuple(e.shape)) or head(e)
    d = model.transformer_decoder.hidden_dim
    visual, audio = _decoder_inputs(model, batch)
    q = torch.randn(2, 3, d)
    groups = [QueryGroup(), QueryGroup(q), QueryGroup(q, classify=False, masks=False, audio_masks="final")]
    outs = model.decode_groups(visual, [audio], groups)
    predictions = 4  # 1 audio + 3 visual layers
    n = model.transformer_decoder.num_queries
    assert calls == [(2, predictions * (n + 3), d)]  # one class-head call: groups 0 and 1 at every prediction
    for g in (0, 1):
        assert "pred_logits" in outs[g] and "pred_masks" in outs[g] and "pred_audio_masks" not in outs[g]
        assert all("pred_logits" in a and "pred_audio_masks" not in a for a in outs[g]["aux_outputs"])
    acp = outs[2]
    assert "pred_logits" not in acp and "pred_masks" not in acp and "audio_pred_logits" not in acp
    assert acp["pred_audio_masks"].shape[:2] == (2, 3)
    assert all("pred_logits" not in a and "pred_audio_masks" not in a for a in acp["aux_outputs"])
    # a training step of full CPM: one class-head call (as the baseline's), where three decodes made 12
    calls.clear()
    model(_batch())
    assert len(calls) == 1


def test_inputs_are_checked_where_they_enter():
    model = _model(_cfg())
    batch = _batch()
    batch[1]["noise_audio"] = -batch[1]["noise_audio"]
    with pytest.raises(ValueError, match=r"frame_0_1\.jpg.*'noise_audio' has negative values.*linear magnitudes"):
        model(batch)
    batch = _batch()
    batch[2]["sem_seg"][0, 0] = 9
    with pytest.raises(ValueError, match=r"frame_0_2\.jpg.*'sem_seg' holds values outside \[0, 4\]"):
        model(batch)
    batch = _batch()
    batch[0]["instances"].gt_classes[0] = 7
    with pytest.raises(ValueError, match=r"frame_0_0\.jpg.*gt_classes outside \[0, 4\]"):
        model(batch)


# ------------------------------------------------------------------------------------------ DDP
def _ddp_worker(out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank = dist.get_rank()
    torch.set_num_threads(1)
    criterion_module.get_uncertain_point_coords_with_randomness = _grid_points
    model, reference = _pair(_cfg(**CASES["batchnorm_audio"]), double=True)
    batch = _batch(seed=10 + rank)  # each rank its own frames
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    fused = _step(lambda m, b: ddp(b), model, batch, seed=1)
    unfused = _step(separate_decodes_losses, reference, batch, seed=1)
    for g in unfused[1].values():  # what DDP does to the fused step's gradients
        if g is not None:
            dist.all_reduce(g)
            g /= dist.get_world_size()
    torch.save({"fused": fused, "unfused": unfused}, Path(out_dir) / f"rank{rank}.pt")


def test_fused_step_equals_separate_decodes_under_ddp(tmp_path):
    compat.launch(_ddp_worker, 2, dist_url="auto", args=(str(tmp_path),))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for res in results:
        _compare(res["fused"], res["unfused"])
    # the ranks saw different frames but hold the same (averaged) gradients
    g0, g1 = results[0]["fused"][1], results[1]["fused"][1]
    assert any(not torch.equal(results[0]["fused"][0][k], results[1]["fused"][0][k]) for k in results[0]["fused"][0])
    for n in g0:
        if g0[n] is not None:
            torch.testing.assert_close(g0[n], g1[n], atol=1e-6, rtol=1e-5, msg=n)
