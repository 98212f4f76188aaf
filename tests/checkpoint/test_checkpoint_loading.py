"""AVSCheckpointer's loading side: strict refusals, the load report, Mask2Former initialisation."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cpm_d2  # noqa: F401
from cpm_d2.checkpoint import AVSCheckpointer
from cpm_d2.checkpoint.loading import CheckpointError, CheckpointMismatchError, CheckpointReadError
from cpm_d2.checkpoint.mask2former import is_mask2former_state_dict, remap_mask2former_state_dict
from cpm_d2.config import setup_cfg
from detectron2.modeling import build_model

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "synthetic" / "baseline_r18_tiny.yaml")
# The tiny model with Mask2Former's pixel decoder (one deformable encoder layer); DEC_LAYERS 3.
M2F_OPTS = ["MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "MSDeformAttnPixelDecoder", "MODEL.DEVICE", "cpu"]


def _model(*opts, config=TINY):
    torch.manual_seed(0)
    return build_model(setup_cfg(config, ["MODEL.DEVICE", "cpu", *opts]))


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- strict / reported
def test_own_checkpoint_loads_completely(tmp_path):
    src, dst = _model(), _model("SEED", "1")
    torch.nn.init.normal_(src.transformer_decoder.query_feat.weight)
    torch.save({"model": src.state_dict(), "iteration": 3}, tmp_path / "m.pth")
    ckpt = AVSCheckpointer(dst, strict=True)
    extra = ckpt.load(str(tmp_path / "m.pth"))
    assert extra["iteration"] == 3
    report = ckpt.last_load_report
    assert report.complete and report.layout == "cpm_d2"
    assert len(report.loaded) == len(dst.state_dict())
    assert torch.equal(dst.transformer_decoder.query_feat.weight, src.transformer_decoder.query_feat.weight)


def test_strict_refuses_another_class_count_before_touching_the_model(tmp_path):
    path = tmp_path / "seven.pth"
    torch.save({"model": _model("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7").state_dict()}, path)
    model = _model()
    before = _params(model)
    with pytest.raises(CheckpointMismatchError) as err:
        AVSCheckpointer(model, strict=True).load(str(path))
    msg = str(err.value)
    assert str(path) in msg
    assert "checkpoint for 7 classes" in msg and "MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5" in msg
    assert "transformer_decoder.class_predictor.linear.weight (checkpoint (8, 64), model (6, 64))" in msg
    assert "--allow-partial-weights" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "nothing was loaded"

    # Not strict (training / fine-tuning): everything else loads, the head stays as initialised.
    ckpt = AVSCheckpointer(model)
    ckpt.load(str(path))
    report = ckpt.last_load_report
    assert {k for k, _, _ in report.mismatched} == {
        "transformer_decoder.class_predictor.linear.weight", "transformer_decoder.class_predictor.linear.bias"}
    assert not report.missing and not report.unexpected
    assert torch.equal(model.transformer_decoder.class_predictor.linear.weight,
                       before["transformer_decoder.class_predictor.linear.weight"])
    assert "The class head is for 7 classes, the model has 5" in report.summary()


def test_strict_names_missing_and_extra_tensors(tmp_path):
    state = _model().state_dict()
    state.pop("transformer_decoder.query_feat.weight")
    state["transformer_decoder.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "plain.pth")  # a bare state dict (no "model" key) is accepted too
    with pytest.raises(CheckpointMismatchError, match=r"(?s)1 model tensor\(s\) not in the checkpoint.*"
                       r"query_feat\.weight.*1 checkpoint tensor\(s\) the model does not have.*extra\.weight"):
        AVSCheckpointer(_model(), strict=True).load(str(tmp_path / "plain.pth"))
    # only extra tensors (every model tensor loads): accepted, and reported
    state = _model().state_dict()
    state["transformer_decoder.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "extra.pth")
    ckpt = AVSCheckpointer(_model(), strict=True)
    ckpt.load(str(tmp_path / "extra.pth"))
    assert ckpt.last_load_report.covers_model and not ckpt.last_load_report.complete
    assert ckpt.last_load_report.unexpected == ["transformer_decoder.extra.weight"]


def test_strict_loads_checkpoints_of_the_previous_layout(tmp_path):
    """0.1 checkpoints: the softmax head's EMA prototypes (now gone) are left over, a GMM bank
    without iteration stamps gets age 0; both load strictly."""
    state = _model().state_dict()
    state["transformer_decoder.class_predictor.prototypes"] = torch.zeros(6, 64)
    state["transformer_decoder.class_predictor.prototype_seen"] = torch.zeros(6, dtype=torch.bool)
    torch.save({"model": state}, tmp_path / "linear01.pth")
    AVSCheckpointer(_model(), strict=True).load(str(tmp_path / "linear01.pth"))
    gmm = _model("MODEL.MASK_FORMER.CLASS_PREDICTOR", "GMMClassPredictor")
    state = gmm.state_dict()
    # 0.1 wrote the mixture buffers on the head itself, without the entries' stamps
    prefix = "transformer_decoder.class_predictor."
    for key in list(state):
        if key.startswith(prefix + "mixtures."):
            value = state.pop(key)
            if not key.endswith(("bank_iter", "bank_source", "bank_norm")):
                state[prefix + key[len(prefix + "mixtures."):]] = value
    torch.save({"model": state}, tmp_path / "gmm01.pth")
    other = _model("MODEL.MASK_FORMER.CLASS_PREDICTOR", "GMMClassPredictor")
    AVSCheckpointer(other, strict=True).load(str(tmp_path / "gmm01.pth"))
    assert int(other.class_predictor.mixtures.bank_iter.abs().sum()) == 0


def test_unreadable_missing_or_empty_checkpoints_name_the_file(tmp_path):
    model = _model()
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointReadError, match=rf"cannot read checkpoint {bad}"):
        AVSCheckpointer(model).load(str(bad))
    good = tmp_path / "good.pth"
    torch.save({"model": model.state_dict()}, good)
    cut = tmp_path / "truncated.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointReadError, match=rf"cannot read checkpoint {cut}"):
        AVSCheckpointer(model, strict=True).load(str(cut))
    empty = tmp_path / "empty.pth"
    torch.save({"model": {}}, empty)
    with pytest.raises(CheckpointReadError, match=rf"{empty} holds no model state dict"):
        AVSCheckpointer(model).load(str(empty))
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*nope.pth"):
        AVSCheckpointer(model).load(str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="MODEL.WEIGHTS is empty"):
        AVSCheckpointer(model, strict=True).load("")
    assert AVSCheckpointer(model).load("") == {}  # training from scratch


# ---------------------------------------------------------------------------- Mask2Former
def _mask2former_state_dict(model, num_layers, num_classes):
    """A Mask2Former semantic-segmentation state dict, written with Mask2Former's own names
    (maskformer_model.py, msdeformattn.py, mask2former_transformer_decoder.py), shaped like the
    tiny model. Returns (state dict, {mask2former key: expected CPM key}).
    """
    ours = model.state_dict()
    sd, pairs = {}, {}

    def take(theirs, mine):
        sd[theirs] = torch.randn_like(ours[mine].float())
        pairs[theirs] = mine

    for k in ours:
        if k.startswith("backbone."):
            take(k, k)
    pd = "sem_seg_head.pixel_decoder."
    for i in range(3):
        for j in (0, 1):
            for p in ("weight", "bias"):
                take(f"{pd}input_proj.{i}.{j}.{p}", f"pixel_decoder.input_proj.{i}.{j}.{p}")
    take(f"{pd}transformer.level_embed", "pixel_decoder.level_embed")
    enc_layers = {int(k.split(".")[3]) for k in ours if k.startswith("pixel_decoder.encoder.layers.")}
    for e in sorted(enc_layers):
        for sub in ("self_attn.sampling_offsets", "self_attn.attention_weights", "self_attn.value_proj",
                    "self_attn.output_proj", "norm1", "linear1", "linear2", "norm2"):
            for p in ("weight", "bias"):
                take(f"{pd}transformer.encoder.layers.{e}.{sub}.{p}", f"pixel_decoder.encoder.layers.{e}.{sub}.{p}")
    for theirs, mine in (("adapter_1", "lateral_convs.0"), ("layer_1", "output_convs.0")):
        for p in ("weight", "norm.weight", "norm.bias"):
            take(f"{pd}{theirs}.{p}", f"pixel_decoder.{mine}.{p}")
    for p in ("weight", "bias"):
        take(f"{pd}mask_features.{p}", f"pixel_decoder.mask_features.{p}")
    td = "sem_seg_head.predictor."
    for layer in range(num_layers):
        for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
            take(f"{td}transformer_cross_attention_layers.{layer}.multihead_attn.{p}",
                 f"transformer_decoder.cross_attention.{layer}.attn.{p}")
            take(f"{td}transformer_self_attention_layers.{layer}.self_attn.{p}",
                 f"transformer_decoder.self_attention.{layer}.attn.{p}")
        for p in ("weight", "bias"):
            take(f"{td}transformer_cross_attention_layers.{layer}.norm.{p}",
                 f"transformer_decoder.cross_attention.{layer}.norm.{p}")
            take(f"{td}transformer_self_attention_layers.{layer}.norm.{p}",
                 f"transformer_decoder.self_attention.{layer}.norm.{p}")
            for sub in ("linear1", "linear2", "norm"):
                take(f"{td}transformer_ffn_layers.{layer}.{sub}.{p}", f"transformer_decoder.ffn.{layer}.{sub}.{p}")
    for p in ("weight", "bias"):
        take(f"{td}decoder_norm.{p}", f"transformer_decoder.decoder_norm.{p}")
        for i in range(3):
            take(f"{td}mask_embed.layers.{i}.{p}", f"transformer_decoder.mask_embed.layers.{i}.{p}")
    for name in ("query_feat", "query_embed", "level_embed"):
        take(f"{td}{name}.weight", f"transformer_decoder.{name}.weight")
    hidden = ours["transformer_decoder.query_feat.weight"].shape[1]
    sd[f"{td}class_embed.weight"] = torch.randn(num_classes + 1, hidden)
    sd[f"{td}class_embed.bias"] = torch.randn(num_classes + 1)
    pairs[f"{td}class_embed.weight"] = "transformer_decoder.class_predictor.linear.weight"
    pairs[f"{td}class_embed.bias"] = "transformer_decoder.class_predictor.linear.bias"
    sd["criterion.empty_weight"] = torch.ones(num_classes + 1)
    return sd, pairs


def _save_d2_pkl(path, state_dict):
    """detectron2 model-zoo .pkl layout (numpy arrays; name matching requested, as zoo files may)."""
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state_dict.items()}, "__author__": "Mask2Former",
                     "matching_heuristics": True}, f)


def test_mask2former_checkpoint_initialises_backbone_pixel_decoder_and_visual_decoder(tmp_path):
    model = _model(*M2F_OPTS)
    # Mask2Former DEC_LAYERS 3 -> 2 built layers; the tiny CPM has 3 visual layers; ADE20K-like 150 classes.
    sd, pairs = _mask2former_state_dict(model, num_layers=2, num_classes=150)
    assert is_mask2former_state_dict(sd)
    path = tmp_path / "m2f_ade20k.pkl"
    _save_d2_pkl(path, sd)
    before = _params(model)

    with pytest.raises(CheckpointMismatchError, match="Mask2Former layout"):
        AVSCheckpointer(model, strict=True).load(str(path))
    ckpt = AVSCheckpointer(model)  # training: partial is expected, reported
    ckpt.load(str(path))
    report = ckpt.last_load_report
    assert report.layout == "Mask2Former"

    state = model.state_dict()
    class_head = {"transformer_decoder.class_predictor.linear.weight", "transformer_decoder.class_predictor.linear.bias"}
    for theirs, mine in pairs.items():
        if mine in class_head:
            continue
        assert torch.equal(state[mine], sd[theirs]), (theirs, mine)
    assert set(report.loaded) == set(pairs.values()) - class_head
    # New: the audio side, visual layer 2 (Mask2Former built only 2), the class head (150 vs 5 classes).
    new = {k for k in state if k.startswith(("audio_backbone.", "audio_pixel_decoder.", "transformer_decoder.audio_"))
           or any(k.startswith(f"transformer_decoder.{m}.2.") for m in ("cross_attention", "self_attention", "ffn"))
           or k in ("_iter", "transformer_decoder.class_predictor.prototypes",
                    "transformer_decoder.class_predictor.prototype_seen")}
    assert set(report.missing) == {k for k in new if not k.endswith("num_batches_tracked")}
    assert {k: (a, b) for k, a, b in report.mismatched} == {
        "transformer_decoder.class_predictor.linear.weight": ((151, 64), (6, 64)),
        "transformer_decoder.class_predictor.linear.bias": ((151,), (6,))}
    assert report.dropped == {"criterion.empty_weight": pytest.approx(report.dropped["criterion.empty_weight"])}
    assert not report.unexpected
    for k in new | class_head:
        assert torch.equal(state[k], before[k]), f"{k} should keep its initialisation"

    rows = {r[0]: r for r in report.rows()}
    assert rows["backbone"][1:5] == (len([k for k in state if k.startswith("backbone.")]), 0, 0, 0)
    assert rows["audio_backbone"][1] == 0 and rows["audio_backbone"][2] > 0
    assert rows["transformer_decoder.cross_attention"][1:3] == (12, 6)
    assert "layers loaded 0-1, new 2" in rows["transformer_decoder.cross_attention"][5]
    assert rows["transformer_decoder.class_predictor"][3] == 2
    assert "linear.weight: checkpoint (151, 64) vs model (6, 64)" in rows["transformer_decoder.class_predictor"][5]
    assert rows["criterion"][4] == 1 and "CPM's criterion computes it" in rows["criterion"][5]
    assert "new (not in checkpoint)" in report.table()


def test_mask2former_class_head_loads_when_classes_match():
    model = _model(*M2F_OPTS)
    sd, pairs = _mask2former_state_dict(model, num_layers=3, num_classes=5)
    remapped, renamed, dropped = remap_mask2former_state_dict({"module." + k: v for k, v in sd.items()})
    assert renamed["transformer_decoder.class_predictor.linear.weight"] == "sem_seg_head.predictor.class_embed.weight"
    assert set(dropped) == {"criterion.empty_weight"}
    assert {pairs[k] for k in sd if k in pairs} == set(remapped)
    missing, unexpected = model.load_state_dict(remapped, strict=False)
    assert not unexpected
    assert all(k.startswith(("audio_", "transformer_decoder.audio_", "transformer_decoder.class_predictor.proto"))
               or k == "_iter" for k in missing)


def test_mask2former_into_the_gmm_head_drops_class_embed(tmp_path):
    cfg = str(REPO / "configs" / "synthetic" / "cpm_r18_tiny.yaml")
    model = _model(*M2F_OPTS, config=cfg)
    sd, _ = _mask2former_state_dict(model, num_layers=3, num_classes=5)
    torch.save({"model": sd, "iteration": 90000}, tmp_path / "model_final.pth")
    ckpt = AVSCheckpointer(model)
    ckpt.load(str(tmp_path / "model_final.pth"))
    report = ckpt.last_load_report
    assert set(report.unexpected) == {"transformer_decoder.class_predictor.linear.weight",
                                      "transformer_decoder.class_predictor.linear.bias"}
    assert any(k.endswith("class_predictor.mixtures.means") for k in report.missing)


# ---------------------------------------------------------------------------- train_net --eval-only
@pytest.mark.slow
def test_eval_only_refuses_a_checkpoint_for_other_classes(tmp_path):
    """FINDINGS: a 7-class checkpoint on a 5-class config used to evaluate (mIoU 8.44) and exit 0."""
    from cpm_d2.data.datasets.synthetic import generate_synthetic_avs

    root = generate_synthetic_avs(tmp_path / "data", seed=1, clips_per_split={"val": 1}, frames_per_clip=2,
                                  image_size=(64, 80))
    weights = tmp_path / "seven.pth"
    torch.save({"model": _model("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7").state_dict()}, weights)
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", TINY, "--eval-only",
           "--register-dataset", "t_val", str(root), "val",
           "DATASETS.TEST", "('t_val',)", "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode != 0
    assert "CheckpointMismatchError" in proc.stderr and f"{weights}" in proc.stderr
    assert "checkpoint for 7 classes" in proc.stderr
    assert "copypaste: mIoU" not in proc.stdout + proc.stderr, "nothing was evaluated"

    proc = subprocess.run(cmd[:4] + ["--allow-partial-weights"] + cmd[4:], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "Partial load from" in log and "new (shape differs)" in log
    assert "copypaste: mIoU" in log
