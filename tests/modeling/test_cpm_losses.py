"""CPM losses (ACP target/loss, masked average pooling, PCL, pixel sampling, VCP indices) by hand."""
import math

import numpy as np
import pytest
import torch

import cpm_d2  # noqa: F401  (compat fixes before detectron2)
from cpm_d2.modeling.cpm.losses import (
    acp_loss,
    acp_ratio_target,
    masked_average_pool,
    pcl_loss,
    sample_pixels,
    vcp_indices,
)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ ACP
def _two_source_example():
    # 2 channels, T = F = 2
    clean = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[3.0, 0.0], [0.0, 1.0]]])
    noise = torch.tensor([[[0.0, 0.0], [2.0, 0.0]], [[4.0, 0.0], [1.0, 3.0]]])
    return clean, noise


def test_acp_ratio_target_by_hand():
    clean, noise = _two_source_example()
    # sum over channels: clean = [[4, 0], [2, 1]], noise = [[4, 0], [3, 3]], mixture = [[8, 0], [5, 4]]
    # ratio = [[4/8, 0/0 -> 0], [2/5, 1/4]]
    expected = torch.tensor([[0.5, 0.0], [0.4, 0.25]])
    torch.testing.assert_close(acp_ratio_target(clean, noise, (2, 2)), expected)
    torch.testing.assert_close(acp_ratio_target(clean[None], noise[None], (2, 2)), expected[None])
    # (1, 1), area: clean mean 7/4, mixture mean 17/4 -> 7/17
    torch.testing.assert_close(acp_ratio_target(clean, noise, (1, 1)), torch.tensor([[7.0 / 17.0]]))
    # (1, 2), area over time: clean columns (4+2)/2, (0+1)/2 = 3, 0.5; mixture 6.5, 2 -> 6/13, 1/4
    torch.testing.assert_close(acp_ratio_target(clean, noise, (1, 2)), torch.tensor([[6.0 / 13.0, 0.25]]))
    # upsampling (bilinear) of a constant share stays that share: 1 / (1 + 3) = 0.25
    up = acp_ratio_target(torch.ones(1, 1, 3, 2), torch.full((1, 1, 3, 2), 3.0), (5, 4))
    assert up.shape == (1, 5, 4)
    torch.testing.assert_close(up, torch.full((1, 5, 4), 0.25))
    with pytest.raises(ValueError, match="acp_ratio_target got negative magnitudes"):
        acp_ratio_target(-clean, noise, (2, 2))
    with pytest.raises(ValueError, match="acp_ratio_target expects clean_mag and noise_mag of the same"):
        acp_ratio_target(clean, noise[:1], (2, 2))


def test_acp_loss_by_hand():
    ln3 = math.log(3.0)
    logits = torch.zeros(3, 2, 1, 2)
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    # image 0: sum = [0 + 0, ln3 + 0] -> sigmoid [0.5, 0.75]; target [0.5, 0.25] -> errors [0, 0.25] -> 0.125
    logits[0, 0, 0] = torch.tensor([0.0, ln3])
    # image 1: only prompt 0 counts: sigmoid([ln3, -ln3]) = [0.75, 0.25]; target [1, 0] -> 0.0625 each -> 0.0625
    logits[1, 0, 0] = torch.tensor([ln3, -ln3])
    logits[1, 1, 0] = torch.tensor([100.0, -100.0])  # padded prompt: must be ignored
    logits[2] = 7.0  # image 2 has no valid prompt: skipped
    target = torch.tensor([[[0.5, 0.25]], [[1.0, 0.0]], [[0.0, 0.0]]])
    logits.requires_grad_(True)
    loss = acp_loss(logits, valid, target)
    torch.testing.assert_close(loss, torch.tensor((0.125 + 0.0625) / 2))
    loss.backward()
    assert (logits.grad[1, 1] == 0).all() and (logits.grad[2] == 0).all()
    assert logits.grad[0, 0, 0, 1] > 0  # prediction 0.75 above target 0.25
    # no valid prompt at all: 0, differentiable
    logits2 = torch.randn(2, 3, 2, 2, requires_grad=True)
    loss2 = acp_loss(logits2, torch.zeros(2, 3, dtype=torch.bool), torch.rand(2, 2, 2))
    assert loss2.item() == 0.0
    loss2.backward()
    assert (logits2.grad == 0).all()
    with pytest.raises(ValueError, match=r"prompt_valid must be \(B, K\)"):
        acp_loss(logits2, torch.zeros(2, 2, dtype=torch.bool), torch.rand(2, 2, 2))


# ------------------------------------------------------------------------------------------ PCL
def test_masked_average_pool_by_hand():
    feats = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]]]).reshape(1, 2, 1, 4)
    feats.requires_grad_(True)
    logits = torch.tensor(
        [
            [2.0, 1.0, -1.0, -2.0],  # sigmoid mean 0.5 -> mask [1, 1, 0, 0] -> [1.5, 15]
            [0.0, 0.0, 0.0, 0.0],  # constant: nothing above the mean -> all positions -> [2.5, 25]
            [0.0, 0.0, 0.0, 5.0],  # sigmoid [.5, .5, .5, .993], mean .62 -> only the last -> [4, 40]
        ]
    ).reshape(1, 3, 1, 4)
    out = masked_average_pool(logits, feats)
    torch.testing.assert_close(out, torch.tensor([[[1.5, 15.0], [2.5, 25.0], [4.0, 40.0]]]))
    out.sum().backward()
    # d/dfeat of the three means summed: positions 0, 1 get 1/2 + 1/4, position 2 gets 1/4, 3 gets 1/4 + 1
    torch.testing.assert_close(feats.grad[0, 0, 0], torch.tensor([0.75, 0.75, 0.25, 1.25]))
    with pytest.raises(ValueError, match="masked_average_pool needs the same batch and T'xF' grid"):
        masked_average_pool(logits, feats[..., :3])


def _infonce_numpy(anchors, alabels, pixels, plabels, tau, normalize):
    if normalize:
        anchors = anchors / np.linalg.norm(anchors, axis=1, keepdims=True)
        pixels = pixels / np.linalg.norm(pixels, axis=1, keepdims=True)
    per_anchor = []
    for a in range(len(anchors)):
        pos = [p for p in range(len(pixels)) if plabels[p] == alabels[a]]
        neg = [p for p in range(len(pixels)) if plabels[p] != alabels[a]]
        if not pos:
            continue
        terms = []
        for p in pos:
            s_p = math.exp(anchors[a] @ pixels[p] / tau)
            s_n = sum(math.exp(anchors[a] @ pixels[n] / tau) for n in neg)
            terms.append(-math.log(s_p / (s_p + s_n)))
        per_anchor.append(sum(terms) / len(terms))
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


@pytest.mark.parametrize("normalize,tau", [(True, 0.1), (False, 0.5)])
def test_pcl_equals_hand_computed_infonce(normalize, tau):
    rng = np.random.default_rng(0)
    anchors = rng.normal(size=(3, 4))
    pixels = rng.normal(size=(6, 4))
    alabels = np.array([0, 1, 2])  # anchor 2 has no positive pixel: skipped
    plabels = np.array([0, 0, 1, 3, 3, 1])
    expected = _infonce_numpy(anchors, alabels, pixels, plabels, tau, normalize)
    a = torch.tensor(anchors, dtype=torch.float32, requires_grad=True)
    got = pcl_loss(a, torch.tensor(alabels), torch.tensor(pixels, dtype=torch.float32), torch.tensor(plabels),
                   temperature=tau, normalize=normalize)
    assert abs(got.item() - expected) < 1e-4 * max(1.0, abs(expected))
    got.backward()
    assert torch.isfinite(a.grad).all() and (a.grad[2] == 0).all() and a.grad[:2].abs().sum() > 0


def test_pcl_image_negatives_restrict_pairs_to_the_anchors_image():
    """PCL.NEGATIVES "image": an anchor's positives and negatives are the pixels of its own image.
    Equal to the batch-wide loss computed on each image's pixels separately."""
    rng = np.random.default_rng(1)
    anchors = rng.normal(size=(3, 4))
    pixels = rng.normal(size=(8, 4))
    alabels, aimg = np.array([1, 2, 1]), np.array([0, 0, 1])
    plabels, pimg = np.array([1, 2, 0, 0, 1, 2, 2, 0]), np.array([0, 0, 0, 0, 1, 1, 1, 1])
    t = lambda x, dt=torch.float32: torch.tensor(x, dtype=dt)  # noqa: E731
    got = pcl_loss(t(anchors), t(alabels, torch.long), t(pixels), t(plabels, torch.long), temperature=0.2,
                   anchor_images=t(aimg, torch.long), pixel_images=t(pimg, torch.long))
    per_anchor = []  # each anchor against its own image's pixels only, by the numpy reference
    for i in range(3):
        keep = pimg == aimg[i]
        per_anchor.append(_infonce_numpy(anchors[i:i + 1], alabels[i:i + 1], pixels[keep], plabels[keep], 0.2, True))
    assert got.item() == pytest.approx(np.mean(per_anchor), rel=1e-4)
    batch = pcl_loss(t(anchors), t(alabels, torch.long), t(pixels), t(plabels, torch.long), temperature=0.2)
    assert batch.item() == pytest.approx(_infonce_numpy(anchors, alabels, pixels, plabels, 0.2, True), rel=1e-4)
    assert abs(batch.item() - got.item()) > 1e-5  # the two negative sets differ
    with pytest.raises(ValueError, match="both"):
        pcl_loss(t(anchors), t(alabels, torch.long), t(pixels), t(plabels, torch.long),
                 anchor_images=t(aimg, torch.long))


def test_pcl_edge_cases():
    # no negatives: -log(e^s / e^s) = 0 for every pair; gradients stay finite
    a = torch.randn(2, 3, requires_grad=True)
    loss = pcl_loss(a, torch.tensor([1, 1]), torch.randn(4, 3), torch.tensor([1, 1, 1, 1]))
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert torch.isfinite(a.grad).all()
    # no anchor has a positive: 0, still differentiable
    b = torch.randn(2, 3, requires_grad=True)
    loss = pcl_loss(b, torch.tensor([5, 6]), torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))
    assert loss.item() == 0.0
    loss.backward()
    assert (b.grad == 0).all()


def _label_map():
    # 4x4 feature grid; labels at full resolution 8x8 (nearest picks the even rows/columns)
    small = torch.tensor(
        [
            [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [255, 255, 255, 0]],  # class 1: one pixel; 3 ignored
            [[2, 2, 3, 3], [2, 2, 3, 3], [4, 4, 4, 4], [4, 4, 4, 4]],
        ]
    )
    return small, small.repeat_interleave(2, 1).repeat_interleave(2, 2)


def test_sample_pixels_labels_match_and_ignore_is_excluded():
    small, sem_seg = _label_map()
    B, D, H, W = 2, 3, 4, 4
    feats = torch.zeros(B, D, H, W)
    feats[:, 0] = small.float()  # channel 0 = label, channel 1 = position, channel 2 = image
    feats[:, 1] = torch.arange(H * W, dtype=torch.float32).reshape(H, W)
    feats[:, 2] = torch.arange(B, dtype=torch.float32)[:, None, None]
    feats.requires_grad_(True)
    out, labels, img = sample_pixels(feats, sem_seg, 6, generator=torch.Generator().manual_seed(0))
    assert out.shape == (12, 3) and labels.shape == (12,) and img.shape == (12,)
    assert torch.equal(out[:, 0].long(), labels) and torch.equal(out[:, 2].long(), img)
    assert (labels != 255).all()
    for b in range(B):
        pos = out[img == b, 1]
        assert len(pos.unique()) == len(pos) == 6  # without replacement
    out.sum().backward()
    assert feats.grad.sum() == 12 * 3  # gradient reaches the sampled positions
    # more pixels than valid ones: every valid pixel exactly once
    out, labels, img = sample_pixels(feats.detach(), sem_seg, 100)
    assert (img == 0).sum() == 13 and (img == 1).sum() == 16
    assert sorted(out[img == 0, 1].long().tolist()) == [i for i in range(16) if i not in (12, 13, 14)]


def test_sample_pixels_is_class_balanced():
    small, sem_seg = _label_map()
    feats = torch.randn(2, 3, 4, 4)
    hits = 0
    trials = 200
    gen = torch.Generator().manual_seed(1)
    for _ in range(trials):
        _, labels, img = sample_pixels(feats, sem_seg, 4, generator=gen)
        hits += int((labels[img == 0] == 1).any())
    # the single class-1 pixel among 13 valid ones: uniform sampling of 4 would include it with
    # probability 4/13 ~ 0.31; class-balanced weights (half the mass on it) include it ~95% of the time
    assert hits / trials > 0.8


# ------------------------------------------------------------------------------------------ VCP
def test_vcp_indices_maps_prompts_to_targets():
    prompts = [torch.tensor([3, 0, 5]), torch.tensor([2, 4])]
    targets = [{"labels": torch.tensor([0, 5, 3]), "masks": torch.zeros(3, 2, 2)}, {"labels": torch.tensor([1, 4])}]
    idx = vcp_indices(prompts, targets)
    assert [q.tolist() for q, _ in idx] == [[0, 1, 2], [1]]  # class 2 has no target in image 1
    assert [t.tolist() for _, t in idx] == [[2, 0, 1], [1]]
    assert all(q.dtype == torch.int64 and t.dtype == torch.int64 for q, t in idx)
    # permuting the prompts permutes the assignment consistently
    perm = torch.tensor([2, 0, 1])
    (q, t), = vcp_indices([prompts[0][perm]], targets[:1])
    assert q.tolist() == [0, 1, 2]
    assert t.tolist() == idx[0][1][perm].tolist()
    for qi, ti in zip(q, t):
        assert prompts[0][perm][qi] == targets[0]["labels"][ti]
    # detectron2 Instances targets work too
    from detectron2.structures import Instances

    inst = Instances((2, 2))
    inst.gt_classes = torch.tensor([5, 3, 0])
    (q, t), = vcp_indices([prompts[0]], [inst])
    assert t.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="vcp_indices got 2 prompt label sets but 1 targets"):
        vcp_indices(prompts, targets[:1])
