"""The CPM meta-architecture (class-agnostic path) on the tiny config: training step with empty
frames, assignments, inference at an unseen size, custom queries, checkpoint round trip and
loading detectron2-layout ResNet weights."""
import pickle

import pytest
import torch
import torch.nn.functional as F

import cpm_d2  # noqa: F401
import cpm_d2.modeling  # noqa: F401  (registers CPM and its pieces)
from detectron2.checkpoint import DetectionCheckpointer
from cpm_d2.config import get_cfg
from detectron2.modeling import build_model
from cpm_d2.data.dataset_mapper import instances_from_sem_seg

torch.set_num_threads(2)
C = 3  # background + 2 classes


def _cfg(**overrides):
    cfg = get_cfg()
    cfg.merge_from_file("configs/synthetic/baseline_r18_tiny.yaml")
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = C
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(_cfg(**overrides))


def _item(sem, audio_seed=0, height=None, width=None, name="frame.jpg"):
    h, w = sem.shape
    g = torch.Generator().manual_seed(audio_seed)
    inst = instances_from_sem_seg(sem)
    return {"file_name": name, "image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
            "sem_seg": sem, "instances": inst, "audio": torch.rand(1, 32, 24, generator=g),
            "height": height or h, "width": width or w}


def _batch():
    s1 = torch.zeros(61, 83, dtype=torch.long)
    s1[5:30, 10:40] = 1
    s1[35:55, 50:80] = 2
    s1[0:3, :] = 255
    s2 = torch.zeros(57, 77, dtype=torch.long)  # background only: K = 1
    s3 = torch.full((61, 83), 255, dtype=torch.long)  # all ignore: K = 0
    return [_item(s1, 1), _item(s2, 2), _item(s3, 3)]


@pytest.mark.parametrize("pixel_decoder", ["FPNPixelDecoder", "MSDeformAttnPixelDecoder"])
def test_train_step_with_empty_frames(pixel_decoder):
    model = _model(**{"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME": pixel_decoder})
    model.train()
    batch = _batch()
    losses = model(batch)
    # 1 audio layer + 3 visual layers -> 3 aux predictions + final, 3 losses each
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1", "_2")}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    for prefix in ("backbone.", "pixel_decoder.", "audio_backbone.", "audio_pixel_decoder.",
                   "transformer_decoder.query_feat", "transformer_decoder.class_predictor", "transformer_decoder.mask_embed"):
        assert any(n.startswith(prefix) and g is not None and g.abs().sum() > 0 for n, g in grads.items()), prefix

    a = model.last_assignments
    assert a.device.type == "cpu" and a.dtype == torch.long and a.shape == (3, 10)
    assert sorted(a[0][a[0] != C].tolist()) == [0, 1, 2]  # each class of frame 1 once
    assert a[1][a[1] != C].tolist() == [0]  # background-only frame
    assert (a[2] == C).all()  # nothing to match
    assert int(model._iter) == 1
    model(batch)
    assert int(model._iter) == 2


def test_class_agnostic_losses_exposes_final_indices_and_weights():
    model = _model(**{"MODEL.MASK_FORMER.DEEP_SUPERVISION": "False"})
    model.train()
    batch = _batch()
    images = model.preprocess_image(batch)
    outputs = model.decode(model.encode_visual(images.tensor),
                           model.encode_audio(model.log_spectrogram(model.preprocess_audio(batch))))
    targets = model.prepare_targets(batch, images)
    # targets are padded to the padded image size; sem_seg padding is ignore
    hp, wp = images.tensor.shape[-2:]
    assert hp % 32 == 0 and wp % 32 == 0
    assert targets[1]["masks"].shape == (1, hp, wp) and not targets[1]["masks"][:, 57:, :].any()
    assert (targets[1]["sem_seg"][57:, :] == 255).all() and (targets[1]["sem_seg"][:57, :77] == 0).all()
    losses, indices, num_masks = model.class_agnostic_losses(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    assert len(indices) == 1  # no deep supervision: the final prediction's matching only
    final = indices[-1]
    assert [len(i[0]) for i in final] == [3, 1, 0]
    assert num_masks == 4  # every target mask of the batch, background included
    torch.manual_seed(3)
    raw = model.criterion({k: v for k, v in outputs.items() if k != "aux_outputs"}, targets, indices=final)
    w = model.weight_dict
    assert losses["loss_ce"].item() == pytest.approx(w["loss_ce"] * raw["loss_ce"].item(), rel=1e-5)
    assigned = model.observe_assignments(outputs, targets, indices)
    for b, (src, tgt) in enumerate(final):
        assert assigned[b, src].tolist() == targets[b]["labels"][tgt].tolist()


@pytest.mark.parametrize("rule", ["soft_sum", "argmax_query"])
def test_inference_at_unseen_size_matches_semantic_formula(rule):
    model = _model(**{"MODEL.MASK_FORMER.TEST.SEMANTIC_INFERENCE": rule})
    model.eval()
    sem = torch.zeros(45, 71, dtype=torch.long)
    item = _item(sem, 5, height=90, width=142)
    with torch.no_grad():
        out = model([item])[0]
        # independent recomputation from the decoder outputs
        images = model.preprocess_image([item])
        o = model.decode(model.encode_visual(images.tensor),
                         model.encode_audio(model.log_spectrogram(model.preprocess_audio([item]))))
    assert out["sem_seg"].shape == (C, 90, 142)
    assert (out["sem_seg"] >= 0).all() and torch.isfinite(out["sem_seg"]).all()
    m = F.interpolate(o["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
    m = F.interpolate(m[:, :, :45, :71], size=(90, 142), mode="bilinear", align_corners=False)[0].sigmoid()
    p = o["pred_logits"][0].softmax(-1)  # (Q, C + 1)
    if rule == "soft_sum":
        expected = (p[:, :C, None, None] * m[:, None]).sum(0)
    else:  # per class, the best p_i(c_i) m_i over the queries whose most likely class c_i is c
        score, cls = p.max(-1)
        expected = torch.zeros(C, 90, 142)
        for i in range(p.shape[0]):
            if cls[i] < C:
                expected[cls[i]] = torch.maximum(expected[cls[i]], score[i] * m[i])
    assert torch.allclose(out["sem_seg"], expected, atol=1e-5)
    ap = out["audio_class_probs"]
    assert ap.shape == (C,)
    assert torch.allclose(ap, o["audio_pred_logits"][0].softmax(-1)[:, :C].max(0).values)


def test_custom_queries_with_padding():
    model = _model()
    model.eval()
    batch = _batch()[:2]
    with torch.no_grad():
        images = model.preprocess_image(batch)
        vis = model.encode_visual(images.tensor)
        aud = model.encode_audio(model.log_spectrogram(model.preprocess_audio(batch)))
        d = model.transformer_decoder.hidden_dim
        q = torch.randn(2, 4, d)
        pos = torch.randn(2, 4, d)
        pad = torch.tensor([[False, False, True, True], [False, False, False, True]])
        o1 = model.decode(vis, aud, queries=q, query_pos=pos, query_padding_mask=pad, audio_masks=True)
        q2 = q.clone()
        q2[pad] = 100 * torch.randn(int(pad.sum()), d)  # change only the padded queries
        o2 = model.decode(vis, aud, queries=q2, query_pos=pos, query_padding_mask=pad, audio_masks=True)
        plain = model.decode(vis, aud, queries=q, query_pos=pos, query_padding_mask=pad)
    assert "pred_audio_masks" not in plain and all("pred_audio_masks" not in a for a in plain["aux_outputs"])
    assert torch.equal(plain["pred_masks"], o1["pred_masks"])  # audio masks are a read-out only
    assert o1["pred_logits"].shape == (2, 4, C + 1) and o1["pred_audio_masks"].shape[:2] == (2, 4)
    assert o1["query_embeddings"].shape == (2, 4, d)
    assert torch.equal(o1["query_padding_mask"], pad)
    keep = ~pad
    for k in ("pred_logits", "pred_masks", "pred_audio_masks", "audio_pred_logits"):
        assert torch.allclose(o1[k][keep], o2[k][keep], atol=1e-4), k
    with pytest.raises(ValueError, match=r"queries must be \(B=2, Q, "):
        model.decode(vis, aud, queries=torch.randn(2, 4, d + 1))


def test_checkpoint_roundtrip_is_bit_identical(tmp_path):
    model = _model(seed=0)
    model.train()
    model(_batch())  # moves _iter
    model.eval()
    item = _item(torch.zeros(50, 70, dtype=torch.long), 9)
    with torch.no_grad():
        ref = model([item])[0]
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    other = _model(seed=123)
    DetectionCheckpointer(other).load(str(tmp_path / "model.pth"))
    other.eval()
    with torch.no_grad():
        got = other([item])[0]
    assert torch.equal(ref["sem_seg"], got["sem_seg"]) and torch.equal(ref["audio_class_probs"], got["audio_class_probs"])
    assert int(other._iter) == 1


def test_model_weights_load_detectron2_resnet_into_backbone(tmp_path):
    # A detectron2-layout (torchvision-converted) ImageNet R18 file, as MODEL.WEIGHTS points to.
    torch.manual_seed(1)
    donor = build_model(_cfg()).backbone
    state = {k: v.numpy() for k, v in donor.state_dict().items()}
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "torchvision", "matching_heuristics": True}, f)
    model = _model(seed=0)
    audio_before = {k: v.clone() for k, v in model.audio_backbone.state_dict().items()}
    DetectionCheckpointer(model).load(str(path))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, torch.as_tensor(state[k])), k
    for k, v in model.audio_backbone.state_dict().items():
        assert torch.equal(v, audio_before[k]), k


def test_bad_inputs_raise_clear_errors():
    model = _model()
    model.train()
    batch = _batch()
    batch[1]["audio"] = torch.rand(2, 32, 24)
    with pytest.raises(ValueError, match="frame.jpg.*MODEL.AUDIO.IN_CHANNELS"):
        model(batch)
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        build_model(_cfg(**{"INPUT.FORMAT": "BGR"}))


@pytest.mark.parametrize("dec_layers, audio_layers", [(2, 0), (3, 1), (4, 2)])
def test_decoder_predictions_counts_what_the_decoder_returns(dec_layers, audio_layers):
    from cpm_d2.modeling.decoder_predictions import decoder_predictions
    from cpm_d2.modeling.criterion import loss_weight_dict

    overrides = {"MODEL.MASK_FORMER.DEC_LAYERS": str(dec_layers), "MODEL.MASK_FORMER.AUDIO_DEC_LAYERS": str(audio_layers)}
    model = _model(**overrides)
    model.eval()
    batch = _batch()[:1]
    with torch.no_grad():
        images = model.preprocess_image(batch)
        vis = model.encode_visual(images.tensor)
        aud = model.encode_audio(model.log_spectrogram(model.preprocess_audio(batch)))
        out = model.decode(vis, aud)
    expected = max(audio_layers, 1) + dec_layers - 1  # audio layers (or the raw queries) + masked-attention layers
    assert 1 + len(out["aux_outputs"]) == decoder_predictions(_cfg(**overrides)) == expected
    assert sum(k.startswith("loss_ce") for k in loss_weight_dict(_cfg(**overrides))) == expected
