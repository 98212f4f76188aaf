"""Model pieces in isolation: matcher, loss arithmetic, deformable attention, audio backbone,
class predictor prompts. Expected values are derived by hand (arithmetic in the comments) or
by an independent computation (brute force over permutations, numpy)."""
import itertools
import math

import pytest
import torch

import cpm_d2  # noqa: F401  (compat fixes before detectron2 imports)
from cpm_d2.modeling.pixel_decoder import AudioPixelDecoder
from cpm_d2.modeling.backbone import AudioResNet, load_audio_backbone_weights
from cpm_d2.modeling.class_predictor import build_class_predictor
from cpm_d2.modeling.criterion import SetCriterion, dice_loss, sigmoid_ce_loss, sigmoid_focal_loss
from cpm_d2.modeling.matcher import HungarianMatcher, batch_dice_cost, batch_sigmoid_ce_cost, batch_sigmoid_focal_cost
from cpm_d2.modeling.pixel_decoder import MSDeformAttnPixelDecoder, build_pixel_decoder, ms_deform_attn_core
from cpm_d2.modeling.transformer_decoder import PositionEmbeddingSine
from cpm_d2.config import get_cfg
from detectron2.layers import ShapeSpec

torch.set_num_threads(2)


def _cfg():
    cfg = get_cfg()
    cfg.merge_from_file("configs/synthetic/baseline_r18_tiny.yaml")
    return cfg


# ---------------------------------------------------------------------------------- matcher
def test_matcher_finds_optimum_where_greedy_fails():
    # Class cost only: cost[i, j] = -p_i(c_j). Probabilities over 3 classes + no-object, chosen so
    # that greedy (query 0 takes its best target first) is not optimal:
    #   q0: p = [0.6, 0.4, 0.0, 0.0]   q1: p = [0.5, 0.0, 0.0, 0.5]   q2: p = [0.1, 0.1, 0.1, 0.7]
    # targets: labels [0, 1]. Greedy: q0 -> 0 (0.6), then best of the rest for label 1 is 0.1 -> total 0.7.
    # Optimal: q1 -> 0 (0.5), q0 -> 1 (0.4) -> total 0.9.
    probs = torch.tensor([[0.6, 0.4, 1e-6, 1e-6], [0.5, 1e-6, 1e-6, 0.5], [0.1, 0.1, 0.1, 0.7]])
    logits = probs.log()[None]
    outputs = {"pred_logits": logits, "pred_masks": torch.zeros(1, 3, 4, 4)}
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.zeros(2, 4, 4, dtype=torch.bool)}]
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=0.0, cost_dice=0.0, num_points=16)
    (rows, cols), = matcher(outputs, targets)
    got = sorted(zip(rows.tolist(), cols.tolist()))
    # brute force over all injective assignments of 2 targets to 3 queries
    p = probs / probs.sum(-1, keepdim=True)  # = softmax(log probs)
    best = min(itertools.permutations(range(3), 2), key=lambda qs: -(p[qs[0], 0] + p[qs[1], 1]).item())
    assert got == sorted(zip(best, [0, 1]))
    assert got == [(0, 1), (1, 0)]


def test_matcher_recovers_mask_permutation_and_is_invariant_to_query_order():
    torch.manual_seed(0)
    h = w = 16
    tg = torch.zeros(3, h, w, dtype=torch.bool)
    tg[0, :8, :8] = True
    tg[1, 8:, :] = True
    tg[2, :8, 8:] = True
    perm = torch.tensor([4, 0, 2])  # target j is copied into query perm[j]
    masks = torch.full((1, 5, h, w), -10.0)
    for j, q in enumerate(perm.tolist()):
        masks[0, q][tg[j]] = 10.0
    logits = torch.randn(1, 5, 4) * 0.1
    outputs = {"pred_logits": logits, "pred_masks": masks}
    targets = [{"labels": torch.tensor([1, 2, 0]), "masks": tg}]
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64, mask_cost="focal")
    torch.manual_seed(1)
    (rows, cols), = matcher(outputs, targets)
    assert {(r, c) for r, c in zip(rows.tolist(), cols.tolist())} == {(q, j) for j, q in enumerate(perm.tolist())}

    # random predictions: permuting the queries permutes the assignment (same sampled points)
    out = {"pred_logits": torch.randn(2, 6, 4), "pred_masks": torch.randn(2, 6, 8, 8)}
    tgts = [{"labels": torch.tensor([0, 3, 1]), "masks": torch.rand(3, 16, 16) > 0.5},
            {"labels": torch.tensor([2]), "masks": torch.rand(1, 16, 16) > 0.5}]
    qperm = torch.randperm(6)
    out_p = {k: v[:, qperm] for k, v in out.items()}
    torch.manual_seed(7)
    ref = matcher(out, tgts)
    torch.manual_seed(7)
    got = matcher(out_p, tgts)
    for (r0, c0), (r1, c1) in zip(ref, got):
        assert {(int(qperm[r]), c) for r, c in zip(r1.tolist(), c1.tolist())} == set(zip(r0.tolist(), c0.tolist()))


def test_matcher_handles_empty_targets_and_padding():
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_masks": torch.randn(2, 4, 8, 8),
               "query_padding_mask": torch.tensor([[False, False, True, True], [False] * 4])}
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.rand(2, 8, 8) > 0.5},
               {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}]
    (r0, c0), (r1, c1) = HungarianMatcher(num_points=32)(outputs, targets)
    assert sorted(r0.tolist()) == [0, 1] and sorted(c0.tolist()) == [0, 1]  # padded queries never matched
    assert r1.numel() == 0 and c1.numel() == 0


def test_batched_costs_agree_with_pairwise_losses():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 20)
    t = (torch.rand(1, 2, 20) > 0.5).float()
    ce, dc, fc = batch_sigmoid_ce_cost(x, t), batch_dice_cost(x, t), batch_sigmoid_focal_cost(x, t, 0.25, 2.0)
    for i in range(3):
        for j in range(2):
            assert ce[0, i, j].item() == pytest.approx(sigmoid_ce_loss(x[0, i:i + 1], t[0, j:j + 1], 1).item(), rel=1e-5)
            assert dc[0, i, j].item() == pytest.approx(dice_loss(x[0, i:i + 1], t[0, j:j + 1], 1).item(), rel=1e-5)
            assert fc[0, i, j].item() == pytest.approx(
                sigmoid_focal_loss(x[0, i:i + 1], t[0, j:j + 1], 1, 0.25, 2.0).item(), rel=1e-5)


# ---------------------------------------------------------------------------------- losses by hand
L2, L43 = math.log(2.0), math.log(4.0 / 3.0)
# a 2x2 mask: logits [[0, ln3], [-ln3, 0]] -> sigmoid [[.5, .75], [.25, .5]]; target [[1, 1], [0, 0]]
X = torch.tensor([[0.0, math.log(3.0), -math.log(3.0), 0.0]])
T = torch.tensor([[1.0, 1.0, 0.0, 0.0]])


def test_focal_loss_by_hand():
    # per point: alpha_t * (1 - p_t)^2 * CE
    #   x=0,t=1:    .25 * .5^2  * ln2      = .0625 ln2
    #   x=ln3,t=1:  .25 * .25^2 * ln(4/3)  = .015625 ln(4/3)
    #   x=-ln3,t=0: .75 * .25^2 * ln(4/3)  = .046875 ln(4/3)
    #   x=0,t=0:    .75 * .5^2  * ln2      = .1875 ln2
    # mean over 4 points: (.25 ln2 + .0625 ln(4/3)) / 4 ; num_masks = 1
    expected = (0.25 * L2 + 0.0625 * L43) / 4
    assert sigmoid_focal_loss(X, T, 1.0, 0.25, 2.0).item() == pytest.approx(expected, rel=1e-6)
    assert sigmoid_focal_loss(X, T, 2.0, 0.25, 2.0).item() == pytest.approx(expected / 2, rel=1e-6)


def test_bce_and_dice_by_hand():
    # BCE: mean(ln2, ln(4/3), ln(4/3), ln2)
    assert sigmoid_ce_loss(X, T, 1.0).item() == pytest.approx((L2 + L43) / 2, rel=1e-6)
    # dice: sum(s t) = .5 + .75 = 1.25; sum(s) = 2; sum(t) = 2 -> 1 - (2.5 + 1) / (4 + 1) = 0.3
    assert dice_loss(X, T, 1.0).item() == pytest.approx(0.3, rel=1e-6)


def _criterion(num_classes=2, eos=0.1, **kw):
    matcher = HungarianMatcher(num_points=16)
    return SetCriterion(num_classes, matcher, eos_coef=eos, num_points=16, oversample_ratio=3.0,
                        importance_sample_ratio=0.75, **kw)


def test_cross_entropy_with_no_object_weight_by_hand():
    # C = 2 (+ no-object = index 2). q0 matched to a target of class 1, q1 unmatched (-> 2).
    # q0 logits [0, 0, 0]     -> p(1) = 1/3 -> -log = ln3,   weight 1
    # q1 logits [0, 0, ln 2]  -> p(2) = 2/4 -> -log = ln2,   weight 0.1 (no-object)
    # weighted mean: (ln3 + 0.1 ln2) / 1.1
    crit = _criterion()
    outputs = {"pred_logits": torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, L2]]]), "pred_masks": torch.zeros(1, 2, 2, 2)}
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 2, 2, dtype=torch.bool)}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    got = crit.loss_labels(outputs, targets, indices, 1.0)["loss_ce"].item()
    assert got == pytest.approx((math.log(3.0) + 0.1 * L2) / 1.1, rel=1e-6)
    # a padded query is ignored: pad q1 -> only q0 remains -> ln3
    outputs["query_padding_mask"] = torch.tensor([[False, True]])
    assert crit.loss_labels(outputs, targets, indices, 1.0)["loss_ce"].item() == pytest.approx(math.log(3.0), rel=1e-6)


def test_criterion_given_indices_skips_matching_and_zero_targets_are_differentiable():
    crit = _criterion(num_classes=3)

    def boom(*a, **k):
        raise AssertionError("matcher must not run when indices are given")

    crit.matcher.forward = boom
    logits = torch.randn(2, 4, 4, requires_grad=True)
    masks = torch.randn(2, 4, 8, 8, requires_grad=True)
    outputs = {"pred_logits": logits, "pred_masks": masks,
               "aux_outputs": [{"pred_logits": logits * 2, "pred_masks": masks * 2}]}
    targets = [{"labels": torch.tensor([1, 0]), "masks": torch.rand(2, 8, 8) > 0.5},
               {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}]
    indices = [(torch.tensor([3, 1]), torch.tensor([0, 1])), (torch.zeros(0, dtype=torch.long),) * 2]
    losses = crit(outputs, targets, indices=indices)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}
    sum(losses.values()).backward()
    assert torch.isfinite(masks.grad).all() and masks.grad.abs().sum() > 0

    # a batch with no target at all: every query -> no-object, mask losses exactly 0, still in the graph
    crit2 = _criterion(num_classes=3)
    logits = torch.randn(1, 4, 4, requires_grad=True)
    masks = torch.randn(1, 4, 8, 8, requires_grad=True)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}]
    losses, idx, num_masks = crit2({"pred_logits": logits, "pred_masks": masks}, empty, return_indices=True)
    assert num_masks == 1  # clamped to >= 1
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    expected_ce = -torch.log_softmax(logits.detach(), -1)[0, :, 3].mean()
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    sum(losses.values()).backward()
    assert masks.grad is not None and logits.grad is not None
    assert len(idx) == 1 and idx[-1][0][0].numel() == 0  # one prediction, image 0 unmatched


# ---------------------------------------------------------------------------------- deformable attention
def test_ms_deform_attn_core_samples_bilinearly():
    # one level 3x4, one head, one channel, values v[i, j] = 10 i + j
    v = (10 * torch.arange(3.0)[:, None] + torch.arange(4.0)[None]).reshape(1, 12, 1, 1)
    # (x, y) of the centre of cell (1, 2): ((2 + .5)/4, (1 + .5)/3) -> 12
    # midpoint between cells (0, 0) and (0, 1): x = 1/4, y = .5/3 -> (0 + 1)/2 = 0.5
    loc = torch.tensor([[2.5 / 4, 1.5 / 3], [1.0 / 4, 0.5 / 3]]).view(1, 2, 1, 1, 1, 2)
    w = torch.ones(1, 2, 1, 1, 1)
    out = ms_deform_attn_core(v, [(3, 4)], loc, w)
    assert out[0, :, 0].tolist() == pytest.approx([12.0, 0.5], abs=1e-5)
    # two points with weights .25 / .75 -> weighted sum
    loc2 = torch.tensor([[0.5 / 4, 0.5 / 3], [3.5 / 4, 2.5 / 3]]).view(1, 1, 1, 1, 2, 2)
    out2 = ms_deform_attn_core(v, [(3, 4)], loc2, torch.tensor([0.25, 0.75]).view(1, 1, 1, 1, 2))
    assert out2.item() == pytest.approx(0.25 * 0 + 0.75 * 23, abs=1e-5)


def test_msdeform_pixel_decoder_forward_backward():
    torch.manual_seed(0)
    cfg = _cfg()
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    shapes = {"res2": ShapeSpec(channels=16, stride=4), "res3": ShapeSpec(channels=24, stride=8),
              "res4": ShapeSpec(channels=32, stride=16), "res5": ShapeSpec(channels=40, stride=32)}
    dec = build_pixel_decoder(cfg, shapes)
    assert isinstance(dec, MSDeformAttnPixelDecoder)
    feats = {k: torch.randn(2, s.channels, 64 // s.stride, 96 // s.stride, requires_grad=True) for k, s in shapes.items()}
    mask_features, ms = dec(feats)
    assert mask_features.shape == (2, cfg.MODEL.SEM_SEG_HEAD.MASK_DIM, 16, 24)
    assert [tuple(m.shape[-2:]) for m in ms] == [(2, 3), (4, 6), (8, 12)]
    (mask_features.square().mean() + sum(m.mean() for m in ms)).backward()
    for n, p in dec.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert dec.encoder.layers[0].self_attn.sampling_offsets.weight.grad.abs().sum() > 0
    assert all(f.grad.abs().sum() > 0 for f in feats.values())


# ---------------------------------------------------------------------------------- audio
def test_audio_backbone_and_decoder_shapes():
    torch.manual_seed(0)
    cfg = _cfg()
    bb = AudioResNet(depth=18, in_channels=2, base_channels=8, norm="BN")
    dec = AudioPixelDecoder(bb.output_shape(), conv_dim=32, token_dim=cfg.MODEL.MASK_FORMER.HIDDEN_DIM, norm="GN")
    out = dec(bb(torch.randn(2, 2, 101, 257)))  # 1 s log-STFT grid
    # stem /4: (26, 65); res5 /32: (4, 9) -> 36 tokens
    assert out["dense"].shape == (2, 32, 26, 65) and out["feature_map"].shape == (2, 32, 26, 65)
    assert out["tokens"].shape == (2, 36, 64) and out["tokens_pos"].shape == (2, 36, 64)
    with pytest.raises(ValueError, match=r"expected audio \(B, 2, T, F\)"):
        bb(torch.randn(2, 1, 101, 257))
    with pytest.raises(ValueError, match="DEPTH"):
        AudioResNet(depth=50)


def test_audio_backbone_loads_torchvision_resnet18(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    bb = AudioResNet(depth=18, in_channels=2, base_channels=64, norm="BN")
    load_audio_backbone_weights(bb, str(path))
    sd = bb.state_dict()
    assert torch.equal(sd["layer3.1.conv2.weight"], tv.state_dict()["layer3.1.conv2.weight"])
    stem = tv.state_dict()["conv1.weight"].mean(1, keepdim=True)
    assert torch.allclose(sd["conv1.weight"], stem.repeat(1, 2, 1, 1))


def test_position_encoding_values():
    pe = PositionEmbeddingSine(4, normalize=True)
    pos = pe(torch.zeros(1, 1, 2, 3))
    assert pos.shape == (1, 8, 2, 3)
    # channel 0/1: sin/cos of y = (i+1)/2 * 2pi (frequency 1); channel 4: sin of x = (j+1)/3 * 2pi
    assert pos[0, 0, 0, 0].item() == pytest.approx(math.sin(math.pi), abs=1e-5)
    assert pos[0, 1, 0, 2].item() == pytest.approx(math.cos(math.pi), abs=1e-5)
    assert pos[0, 4, 1, 0].item() == pytest.approx(math.sin(2 * math.pi / 3), abs=1e-5)


# ---------------------------------------------------------------------------------- class predictor
def test_linear_class_predictor_point_prompts_are_learnable():
    """Without CPM the softmax head has no prompts; with CPM ("Point Rep.") it samples rows of a
    learnable (C+1) x D embedding, and gradients of the prompt losses reach that embedding."""
    cfg = _cfg()
    cfg.MODEL.MASK_FORMER.CLASS_PREDICTOR = "LinearClassPredictor"
    plain = build_class_predictor(cfg, num_classes=3, embed_dim=2)
    assert plain(torch.randn(5, 7, 2)).shape == (5, 7, 4)
    assert not plain.can_sample and not any("prompts" in k for k in plain.state_dict())
    with pytest.raises(RuntimeError, match="can_sample"):
        plain.sample(torch.tensor([1]))
    cfg.MODEL.CPM.ENABLED = True
    pred = build_class_predictor(cfg, num_classes=3, embed_dim=2)
    assert pred.can_sample
    z = pred.sample(torch.tensor([1, 3, 1]))
    assert torch.equal(z[0], pred.prompts.weight[1]) and torch.equal(z[0], z[2])
    assert torch.equal(z[1], pred.prompts.weight[3])
    (z * torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])).sum().backward()
    # d/dW[1] = (1, 2) + (5, 6); d/dW[3] = (3, 4); untouched rows get 0
    assert pred.prompts.weight.grad.tolist() == [[0.0, 0.0], [6.0, 8.0], [0.0, 0.0], [3.0, 4.0]]
    with pytest.raises(ValueError, match=r"sample labels must lie in \[0, 3\]"):
        pred.sample(torch.tensor([4]))