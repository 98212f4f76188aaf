"""MODEL.AUDIO.STEREO_POSITION (issue #12): the level-difference position estimate (hand-derived
pans), flip / channel-swap consistency through the mapper and the model, mono is an error, the
switch off is the paper's model exactly, and a short training run that learns to pick the
sounding one of two identical instances."""
import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import cpm_d2  # noqa: F401
import cpm_d2.modeling  # noqa: F401
from cpm_d2.config import get_cfg
from cpm_d2.data import AudioFrontEnd, AVSDatasetMapper
from cpm_d2.data.dataset_mapper import instances_from_sem_seg
from cpm_d2.modeling.transformer_decoder.stereo_position import StereoPositionPrior, frame_on_canvas, stereo_cues
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from _scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
SR = 16000
torch.set_num_threads(2)


def _pan(x):
    """(left, right) gains of the generator's constant-power pan at frame fraction x."""
    theta = 0.5 * math.pi * x
    return math.cos(theta), math.sin(theta)


def _tiny_cfg(on=False, classes=7, **overrides):
    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / "configs/synthetic/baseline_r18_tiny.yaml"))
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = classes
    cfg.MODEL.AUDIO.IN_CHANNELS = 2
    cfg.INPUT.AUDIO.CHANNELS = 2
    cfg.MODEL.AUDIO.STEREO_POSITION.ENABLED = on
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(_tiny_cfg(**kw))


def _inputs(n=2, h=64, w=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
             "audio": torch.rand(2, 97, 64, generator=g), "height": h, "width": w} for _ in range(n)]


# ------------------------------------------------------------------------------ the estimate
@pytest.mark.parametrize("x", [0.0, 1.0, 0.5, 0.2, 0.85])
def test_estimate_of_a_panned_source_is_its_x(x):
    # one source on every bin: x = (2/pi) atan2(R, L) exactly; pure left 0, pure right 1, centre 0.5
    left, right = _pan(x)
    s = torch.rand(3, 40, 30) + 0.1
    mag = torch.stack([left * s, right * s], dim=1)
    cues = stereo_cues(mag, (10, 8))
    assert cues["stereo_x"].shape == (3, 10, 8) and cues["stereo_log_energy"].shape == (3, 10, 8)
    torch.testing.assert_close(cues["stereo_x"], torch.full((3, 10, 8), float(x)), atol=1e-6, rtol=0)
    # the energy is independent of the pan (constant power)
    ref = stereo_cues(torch.stack([s, torch.zeros_like(s)], 1), (10, 8))["stereo_log_energy"]
    torch.testing.assert_close(cues["stereo_log_energy"], ref, atol=1e-5, rtol=0)


def test_estimate_keeps_sources_in_different_bins_apart_and_silence_is_centre():
    mag = torch.zeros(1, 2, 16, 32)
    for band, x in ((slice(0, 8), 0.1), (slice(16, 24), 0.9)):  # two sources, two frequency bands
        left, right = _pan(x)
        mag[0, 0, :, band], mag[0, 1, :, band] = left, right
    cues = stereo_cues(mag, (4, 4))  # cells of 8 bins: 0 = first source, 2 = second, 1 and 3 silent
    torch.testing.assert_close(cues["stereo_x"][0, :, 0], torch.full((4,), 0.1), atol=1e-6, rtol=0)
    torch.testing.assert_close(cues["stereo_x"][0, :, 2], torch.full((4,), 0.9), atol=1e-6, rtol=0)
    torch.testing.assert_close(cues["stereo_x"][0, :, 1], torch.full((4,), 0.5))
    # a silent cell weighs nothing next to a sounding one; an all-silent clip is flat
    assert float(cues["stereo_log_energy"][0, 0, 0] - cues["stereo_log_energy"][0, 0, 1]) > 15
    silent = stereo_cues(torch.zeros(1, 2, 16, 32), (4, 4))
    assert torch.equal(silent["stereo_x"], torch.full((1, 4, 4), 0.5)) and torch.isfinite(silent["stereo_log_energy"]).all()


def test_channel_swap_maps_x_to_one_minus_x():
    mag = torch.rand(2, 2, 50, 40) ** 3
    a, b = stereo_cues(mag, (13, 10)), stereo_cues(mag.flip(1), (13, 10))
    torch.testing.assert_close(b["stereo_x"], 1.0 - a["stereo_x"], atol=1e-6, rtol=0)
    torch.testing.assert_close(b["stereo_log_energy"], a["stereo_log_energy"])


def test_prior_is_zero_at_the_estimate_and_negative_elsewhere():
    prior = StereoPositionPrior(8, width=0.1, init_gain=0.5)
    audio = {"stereo_x": torch.full((1, 2, 2), 0.25), "stereo_log_energy": torch.zeros(1, 2, 2),
             "stereo_frame": torch.tensor([[0.0, 1.0]])}
    bias, x_hat = prior(torch.randn(1, 3, 8), torch.randn(1, 3, 2, 2), audio, mask_width=20)
    assert bias.shape == (1, 3, 1, 20)
    torch.testing.assert_close(x_hat, torch.full((1, 3), 0.25))
    assert (bias <= 0).all() and (bias[..., 4] > -0.2).all()  # column 4's centre (0.225) is nearest 0.25
    # 0.5 frame widths away = 5 sigma: -gain * 25 with the initial gain 0.5
    torch.testing.assert_close(bias[0, :, 0, 14], torch.full((3,), -0.5 * ((0.725 - 0.25) / 0.1) ** 2))
    # frame on the canvas: a frame spanning the canvas' middle half moves and narrows the prior
    audio["stereo_frame"] = torch.tensor([[0.25, 0.5]])
    bias2, _ = prior(torch.randn(1, 3, 8), torch.randn(1, 3, 2, 2), audio, mask_width=20)
    assert int(bias2[0, 0, 0].argmax()) == 7  # 0.25 + 0.5 * 0.25 = 0.375, column 7's centre


def test_stereo_frame_accounts_for_padding_and_span():
    model = _model(on=True)
    inputs = _inputs(n=2, h=64, w=90)  # padded to 96 by the model
    inputs[1]["audio_frame_span"] = torch.tensor([0.25, 0.75])
    images = model.preprocess_image(inputs)
    frame = model.stereo_frame(inputs, images)
    torch.testing.assert_close(frame, torch.tensor([[0.0, 90 / 96], [0.25 * 90 / 96, 0.5 * 90 / 96]]))
    torch.testing.assert_close(frame_on_canvas(torch.tensor([[0.0, 1.0]]), [(64, 96)], 96), torch.tensor([[0.0, 1.0]]))


# ------------------------------------------------------------------------------ flips and swaps
def _write_clip(tmp_path, x_src, w=48, h=32, size=8):
    """A frame with one object (label 1) centred at x_src * w, and 1 s of stereo audio panned to x_src."""
    img = np.full((h, w, 3), 120, np.uint8)
    lab = np.zeros((h, w), np.uint8)
    cx = int(round(x_src * w))
    img[12:12 + size, cx - size // 2:cx + size // 2] = (220, 40, 40)
    lab[12:12 + size, cx - size // 2:cx + size // 2] = 1
    Image.fromarray(img).save(tmp_path / "0.png")
    Image.fromarray(lab).save(tmp_path / "label.png")
    t = np.arange(SR) / SR
    tone = 0.4 * np.sin(2 * np.pi * 700 * t)
    left, right = _pan(x_src)
    sf.write(str(tmp_path / "audio.wav"), np.stack([left * tone, right * tone], 1).astype(np.float32), SR, subtype="FLOAT")
    return {"file_name": str(tmp_path / "0.png"), "sem_seg_file_name": str(tmp_path / "label.png"),
            "audio_file_name": str(tmp_path / "audio.wav"), "audio_start": 0.0, "audio_duration": 1.0,
            "frame_index": 0, "num_frames": 1, "clip_id": "c", "height": h, "width": w}


def _image_x(out):
    """(source x estimated from the shipped audio, mapped into the output image; the label's centre x),
    both as fractions of the output width."""
    cues = stereo_cues(out["audio"][None], (4, 4))
    x = float((cues["stereo_log_energy"].flatten().softmax(0) * cues["stereo_x"].flatten()).sum())
    span = out["audio_frame_span"]
    cols = torch.nonzero(out["sem_seg"] == 1)[:, 1].float()
    return float(span[0] + x * (span[1] - span[0])), float(cols.mean() + 0.5) / out["sem_seg"].shape[1]


@pytest.mark.parametrize("augs, flipped", [
    ([], False),
    ([T.RandomFlip(prob=1.0, horizontal=True)], True),
    ([T.Resize((48, 72)), T.RandomFlip(prob=1.0, horizontal=True)], True),
    ([T.RandomCrop("absolute", (32, 30))], False),
    ([T.RandomCrop("absolute", (32, 30)), T.RandomFlip(prob=1.0, horizontal=True)], True),
])
def test_mapper_keeps_the_estimate_on_the_object_through_flips_and_crops(tmp_path, augs, flipped):
    np.random.seed(3)  # RandomCrop draws from np.random
    d = _write_clip(tmp_path, 0.3)
    mapper = AVSDatasetMapper(is_train=True, augmentations=augs, image_format="RGB",
                              audio_front_end=AudioFrontEnd(channels=2), num_classes=2)
    out = mapper(d)
    est, obj = _image_x(out)
    assert abs(est - obj) < 1.0 / out["sem_seg"].shape[1], (est, obj)
    assert (obj > 0.5) == flipped  # the object (x = 0.3) is on the right only when mirrored
    if not augs:
        torch.testing.assert_close(out["audio_frame_span"], torch.tensor([0.0, 1.0]))


def test_mid_backbone_model_mirrors_every_query_position_exactly():
    model = _model(on=True).eval()  # BACKBONE_INPUT "mid", the default
    inputs = _inputs()
    swapped = [dict(x, audio=x["audio"].flip(0)) for x in inputs]

    def positions(batch):
        images = model.preprocess_image(batch)
        audio = model.audio_features(model.preprocess_audio(batch), model.stereo_frame(batch, images))
        out = model.decode(model.encode_visual(images.tensor), audio)
        return torch.stack([p["pred_stereo_x"] for p in out["aux_outputs"] + [out]])

    with torch.no_grad():
        a, b = positions(inputs), positions(swapped)
    assert a.shape == (4, 2, 10)  # predictions (1 audio + 3 visual layers), images, queries
    torch.testing.assert_close(b, 1.0 - a, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ mono is an error
def test_mono_with_the_switch_on_is_an_error_naming_the_keys(tmp_path):
    mono = _tiny_cfg(on=True)
    mono.MODEL.AUDIO.IN_CHANNELS = 1
    mono.INPUT.AUDIO.CHANNELS = 1
    with pytest.raises(ValueError, match=r"MODEL\.AUDIO\.STEREO_POSITION\.ENABLED.*INPUT\.AUDIO\.CHANNELS = 1"):
        build_model(mono)
    with pytest.raises(ValueError, match=r"INPUT\.AUDIO\.CHANNELS = 1.*MODEL\.AUDIO\.STEREO_POSITION\.ENABLED"):
        AVSDatasetMapper(mono, is_train=False)
    # a stereo config fed a mono wav: the front end would duplicate it (a source always in the middle)
    d = _write_clip(tmp_path, 0.3)
    data, _ = sf.read(d["audio_file_name"])
    sf.write(d["audio_file_name"], data.mean(1).astype(np.float32), SR, subtype="FLOAT")
    stereo = _tiny_cfg(on=True, classes=2)
    stereo.INPUT.TEST_RESIZE_MODE = "short_edge"
    stereo.INPUT.MIN_SIZE_TEST = 0
    with pytest.raises(ValueError, match=r"audio\.wav is mono.*MODEL\.AUDIO\.STEREO_POSITION\.ENABLED"):
        AVSDatasetMapper(stereo, is_train=False)(d)
    stereo.MODEL.AUDIO.STEREO_POSITION.ENABLED = False
    assert AVSDatasetMapper(stereo, is_train=False)(d)["audio"].shape[0] == 2  # off: duplicated as before
    # the decoder refuses audio without the cues instead of silently skipping the prior
    model = _model(on=True).eval()
    batch = _inputs()
    images = model.preprocess_image(batch)
    with pytest.raises(ValueError, match="STEREO_POSITION.ENABLED but the audio dict has no 'stereo_x'"):
        model.decode(model.encode_visual(images.tensor),
                     model.encode_audio(model.log_spectrogram(model.preprocess_audio(batch))))


# ------------------------------------------------------------------------------ off = the paper's model
# Recorded from the model before the stereo position existed (commit 630dfd0), seed 0, these inputs.
# The digest is over the sorted "name:shape" lines: a checkpoint is matched by name, so the order in
# which modules register their parameters is not part of what must stay the same.
GOLDEN = {"keys": 265, "digest": "e8e167a942aa0413", "sem_seg": 3422.591696843505, "logits": 55.1134697124362,
          "masks": 4429.887588920537}


def test_switch_off_reproduces_the_model_before_the_switch():
    model = _model(on=False).eval()
    sd = model.state_dict()
    lines = sorted(f"{k}:{tuple(v.shape)}" for k, v in sd.items())
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    assert (len(sd), digest) == (GOLDEN["keys"], GOLDEN["digest"])
    batch = _inputs()
    with torch.no_grad():
        out = model(batch)
        images = model.preprocess_image(batch)
        dec = model.decode(model.encode_visual(images.tensor),
                           model.encode_audio(model.log_spectrogram(model.preprocess_audio(batch))))
    assert "pred_stereo_x" not in dec and "audio_frame_span" not in batch[0]
    got = {"sem_seg": float(sum(o["sem_seg"].double().sum() for o in out)),
           "logits": float(dec["pred_logits"].double().sum()), "masks": float(dec["pred_masks"].double().abs().sum())}
    for k, v in got.items():
        assert v == pytest.approx(GOLDEN[k], rel=1e-4), k


def test_switch_on_adds_two_parameters_and_with_zero_gain_changes_nothing():
    # with the backbone on both channels (as off) and zero gain, the switch changes no output
    off = _model(on=False).eval()
    on = _model(on=True, **{"MODEL.AUDIO.STEREO_POSITION.BACKBONE_INPUT": "stereo"}).eval()
    sd_off, sd_on = off.state_dict(), on.state_dict()
    assert set(sd_on) - set(sd_off) == {"transformer_decoder.stereo_position.gain_weight",
                                        "transformer_decoder.stereo_position.gain_bias"}
    assert set(sd_off) <= set(sd_on) and all(torch.equal(sd_off[k], sd_on[k]) for k in sd_off)  # same init
    with torch.no_grad():
        on.transformer_decoder.stereo_position.gain_bias.fill_(-1e4)  # softplus -> exactly 0
        batch = _inputs()
        a, b = off(batch), on(batch)
    for x, y in zip(a, b):
        assert torch.equal(x["sem_seg"], y["sem_seg"])


# ------------------------------------------------------------------------------ it learns
H, W, S = 32, 48, 8


def _frame(rng):
    """Two identical squares of class 1; only one sounds (a band panned to its x) and is labelled."""
    img = np.full((3, H, W), 120, np.uint8)
    sem = np.zeros((H, W), np.int64)
    while True:
        xs = sorted(rng.choice(np.arange(2, W - S - 2), 2, replace=False))
        if xs[1] - xs[0] >= S + 6:
            break
    ys = [int(rng.integers(2, H - S - 2)) for _ in range(2)]
    k = int(rng.integers(2))
    for y, x in zip(ys, xs):
        img[:, y:y + S, x:x + S] = np.array([220, 40, 40])[:, None, None]
    sem[ys[k]:ys[k] + S, xs[k]:xs[k] + S] = 1
    left, right = _pan((xs[k] + S / 2) / W)
    mag = rng.uniform(0.0, 0.01, (2, 16, 16)).astype(np.float32)
    mag[0, :, 6:9] += left
    mag[1, :, 6:9] += right
    sem = torch.as_tensor(sem)
    return {"image": torch.as_tensor(img), "audio": torch.as_tensor(mag), "sem_seg": sem, "height": H, "width": W,
            "instances": instances_from_sem_seg(sem), "boxes": (ys, xs, k)}


def _train_and_pick(on, iters=40):
    torch.manual_seed(0)
    model = build_model(_tiny_cfg(on=on, classes=2, **{"MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 4,
                                                        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": 256}))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng, losses = np.random.default_rng(0), []
    for _ in range(iters):
        loss = sum(model([_frame(rng) for _ in range(4)]).values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    rng, picks = np.random.default_rng(123), []
    with torch.no_grad():
        for _ in range(32):
            f = _frame(rng)
            score = model([f])[0]["sem_seg"][1]
            ys, xs, k = f["boxes"]
            s = [float(score[y:y + S, x:x + S].mean()) for y, x in zip(ys, xs)]
            picks.append(s[k] > s[1 - k])
    return float(np.mean(losses[:5])), float(np.mean(losses[-5:])), float(np.mean(picks))


@pytest.mark.slow
def test_short_training_learns_to_pick_the_sounding_instance():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small model on a shared machine: more threads only contend
    try:
        _check_training_picks()
    finally:
        torch.set_num_threads(threads)


def _check_training_picks():
    first, last, pick = _train_and_pick(on=True)
    assert last < 0.5 * first, (first, last)
    assert pick >= 0.85, pick  # the sounding square scores higher in (almost) every held-out frame
    _, _, pick_stem = _train_and_pick(on=False)  # same budget, 2-channel stem only: about chance
    assert pick - pick_stem >= 0.25, (pick, pick_stem)


# ------------------------------------------------------------------------------ tools
def test_eval_tool_scores_frames_and_rebuilds_instance_masks():
    ev = load_script("tools/eval_stereo_instances.py")

    classes = [{"shape": "square"}, {"shape": "circle"}]
    objs = [{"class_id": 2, "cy": 10.0, "cx": 10.0, "size": 8, "sounding": True},
            {"class_id": 2, "cy": 10.0, "cx": 40.0, "size": 8, "sounding": False},
            {"class_id": 1, "cy": 25.0, "cx": 25.0, "size": 8, "sounding": True}]
    groups = ev._instances(objs, classes, 32, 48)
    assert list(groups) == [2] and len(groups[2]) == 2  # the single square is no group
    (mask_a, snd_a, x_a), (mask_b, snd_b, x_b) = groups[2]
    assert snd_a and not snd_b and x_a == pytest.approx(10 / 48) and mask_a[10, 10] and mask_b[10, 40]
    sem = torch.zeros(3, 32, 48)
    sem[2][torch.as_tensor(mask_a)] = 0.9
    sem[2][torch.as_tensor(mask_b)] = 0.2
    assert ev._mean_scores(sem, 2, groups[2]) == pytest.approx([0.9, 0.2])
    rec = dict(n_instances=2, n_sounding=1, dx=0.3, scores=[0.9, 0.2])
    records = [dict(rec, picked=True, swap_flipped=True, swap_followed=True),
               dict(rec, picked=False, swap_flipped=False, swap_followed=True, dx=0.05),
               dict(rec, n_instances=3, scores=[0.9, 0.2, 0.1], picked=True, swap_flipped=False, swap_followed=False)]
    s = ev.score_frames(records)
    assert (s["pick_rate"], s["pick_rate_dx_lt_0.1"], s["pick_rate_dx_ge_0.1"], s["pick_rate_3"]) == (50.0, 0.0, 100.0, 100.0)
    assert (s["swap_flip_rate"], s["swap_follow_rate"], s["frames_two_one"]) == (50.0, 100.0, 2)


def test_ablation_rows_dir_and_extra_eval_command():
    ablation = load_script("tools/ablation.py")

    rows_dir = str(ROOT / "configs" / "stereo_rows")
    assert ablation.all_rows(rows_dir) == ["stem_only", "stereo_position", "stereo_position_sharp", "stereo_position_stem"]
    assert ablation.row_switches("stem_only", rows_dir) == ["MODEL.AUDIO.STEREO_POSITION.ENABLED", "False"]
    assert ablation.row_switches("stereo_position", rows_dir) == [
        "MODEL.AUDIO.STEREO_POSITION.ENABLED", "True", "MODEL.AUDIO.STEREO_POSITION.BACKBONE_INPUT", "mid",
        "MODEL.AUDIO.STEREO_POSITION.WIDTH", "0.1"]
    assert ablation.row_switches("t4_1_baseline")[:2] == ["MODEL.MASK_FORMER.CLASS_PREDICTOR", "GMMClassPredictor"]

    class Args:
        config_file, extra_eval = "configs/synthetic/baseline_r18_stereo_msmi.yaml", "tools/eval_stereo_instances.py"

    job = ablation.Job(Args, "stereo_position", 2, ["MODEL.AUDIO.STEREO_POSITION.ENABLED", "True"], "/o/run",
                       ("ds_val", "ds_test"), "d", "", 1)
    cmd = job._extra_cmd()
    assert cmd[1] == str(ROOT / "tools" / "eval_stereo_instances.py")
    assert cmd[2:] == ["--output", "/o/run/extra_eval.json", "--threads", "1", "--dataset", "ds_test",
                       Args.config_file, "/o/run/model_final.pth", "MODEL.AUDIO.STEREO_POSITION.ENABLED", "True",
                       "OUTPUT_DIR", "/o/run", "SEED", "2"]
    res = {"a": [{"val": {"mIoU": 1}, "test": {"mIoU": 2, "Fbeta": 3}, "test_muted": {"mIoU": 0}, "sts": None,
                  "extra": {"pick_rate": 91.0, "frames_two_one": 110, "note": "x"}}]}
    assert ablation.extra_columns(res) == ["pick_rate", "frames_two_one"]
    table = ablation.format_table(["a"], res, [1], ["pick_rate"])
    assert "| pick_rate |" in table.splitlines()[0] and "91.00 (1 seed)" in table


def test_cpm_prompt_pass_uses_the_stereo_cues_of_the_mixture():
    # full CPM (ACP mixes off-screen noise into the magnitudes): the prompt pass re-derives the cues
    cfg = _tiny_cfg(on=True)
    cfg.merge_from_file(str(ROOT / "configs/synthetic/cpm_r18_tiny.yaml"))
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 7
    cfg.MODEL.AUDIO.IN_CHANNELS = cfg.INPUT.AUDIO.CHANNELS = 2
    cfg.MODEL.AUDIO.STEREO_POSITION.ENABLED = True
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = _inputs(n=2)
    for i, x in enumerate(batch):
        sem = torch.zeros(64, 96, dtype=torch.long)
        sem[10:30, 10 + 40 * i:30 + 40 * i] = i + 1
        x.update(sem_seg=sem, instances=instances_from_sem_seg(sem), noise_audio=torch.rand(2, 97, 64))
    seen = []
    decode_groups = model.decode_groups
    model.decode_groups = lambda visual, audios, groups: seen.append((audios, groups)) or decode_groups(
        visual, audios, groups)
    losses = model(batch)
    assert {"loss_acp", "loss_pcl"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    # one decoder pass: the class-agnostic queries and VCP's prompts hear the clean audio (VCP.AUDIO
    # "clean", the configs'), ACP's prompts the mixture
    assert cfg.MODEL.CPM.VCP.AUDIO == "clean" and len(seen) == 1
    (clean, mixture), groups = seen[0]
    assert [g.audio for g in groups] == [0, 0, 1]
    torch.testing.assert_close(clean["stereo_x"], stereo_cues(torch.stack([x["audio"] for x in batch]),
                                                              clean["stereo_x"].shape[-2:])["stereo_x"])
    mixed = stereo_cues(torch.stack([x["audio"] + x["noise_audio"] for x in batch]), mixture["stereo_x"].shape[-2:])
    torch.testing.assert_close(mixture["stereo_x"], mixed["stereo_x"])
    assert torch.equal(clean["stereo_frame"], mixture["stereo_frame"])
    sum(losses.values()).backward()
    assert model.transformer_decoder.stereo_position.gain_weight.grad.abs().sum() > 0
