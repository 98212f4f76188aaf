"""tools/convert_pretrained.py: torchvision ResNet .pth -> the visual (.pkl) and audio backbone forms."""
import pickle
import re
from pathlib import Path

import pytest
import torch
import torchvision

import cpm_d2  # noqa: F401
from cpm_d2.checkpoint import AVSCheckpointer
from cpm_d2.checkpoint.loading import MIN_BACKBONE_SHARE, CheckpointMismatchError
from cpm_d2.config import setup_cfg
from cpm_d2.modeling.backbone import build_audio_backbone, load_audio_backbone_weights
from detectron2.modeling import build_model

from _scripts import load_script

REPO = Path(__file__).resolve().parents[2]
convert_pretrained = load_script("tools/convert_pretrained.py")

TINY = str(REPO / "configs" / "synthetic" / "baseline_r18_tiny.yaml")


def _torchvision_pth(tmp_path, arch):
    """A locally built torchvision ResNet (no download) with non-trivial BN statistics, saved as .pth."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    path = tmp_path / f"{arch}.pth"
    torch.save(net.state_dict(), path)
    return net.eval(), path


@pytest.mark.parametrize("arch,depth,res2", [("resnet50", 50, 256), ("resnet18", 18, 64)])
def test_visual_conversion_loads_every_backbone_key_and_computes_the_same_features(tmp_path, arch, depth, res2):
    net, pth = _torchvision_pth(tmp_path, arch)
    out = tmp_path / f"R-{depth}.pkl"
    convert_pretrained.main([str(pth), str(out)])
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert data["model"]["backbone.stem.conv1.norm.running_var"].shape == (64,)
    assert not any(k.startswith("backbone.fc") or k.endswith("num_batches_tracked") for k in data["model"])

    cfg = setup_cfg(TINY, ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", str(depth), "MODEL.RESNETS.RES2_OUT_CHANNELS",
                           str(res2), "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.RESNETS.STRIDE_IN_1X1", "False"])
    model = build_model(cfg).eval()
    ckpt = AVSCheckpointer(model)  # training from ImageNet weights: partial by nature, reported
    ckpt.load(str(out))
    report = ckpt.last_load_report
    backbone = {k for k in model.state_dict() if k.startswith("backbone.")}
    assert not [k for k in report.missing if k.startswith("backbone.")]
    assert report.unexpected == [] and report.mismatched == [] and report.dropped == {}
    assert set(report.loaded) == backbone
    assert report.missing and all(not k.startswith("backbone.") for k in report.missing)

    # Hand-checked correspondences, then the strongest check: the same features as torchvision.
    sd = net.state_dict()
    state = model.state_dict()
    assert torch.equal(state["backbone.res3.0.shortcut.weight"], sd["layer2.0.downsample.0.weight"])
    assert torch.equal(state["backbone.res5.1.conv2.norm.running_var"], sd["layer4.1.bn2.running_var"])
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
        got = model.backbone(x)["res5"]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_training_refuses_weights_that_match_too_little_of_the_model(tmp_path):
    """A raw torchvision state dict as MODEL.WEIGHTS used to log '0 model tensors loaded' and train from scratch."""
    _, pth = _torchvision_pth(tmp_path, "resnet18")
    cfg = setup_cfg(TINY, ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM",
                           "FrozenBN", "MODEL.RESNETS.STRIDE_IN_1X1", "False"])
    model = build_model(cfg)
    training = AVSCheckpointer(model, min_backbone_share=MIN_BACKBONE_SHARE)  # the trainer's checkpointer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=rf"MODEL.WEIGHTS {re.escape(str(pth))} .* matches 0 of the "
                       r"model's \d+ tensors and 0% of its \d+ visual-backbone tensors.*`python "
                       r"tools/convert_pretrained.py IN.pth OUT.pkl`.*--allow-partial-weights"):
        training.load(str(pth))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "nothing was copied"
    # the model's own tensors but the backbone (another backbone): below the floor, also refused
    no_backbone = tmp_path / "decoder_only.pth"
    torch.save({"model": {k: v for k, v in before.items() if not k.startswith("backbone.")}}, no_backbone)
    with pytest.raises(CheckpointMismatchError, match=r"and 0% of its"):
        training.load(str(no_backbone))
    # converted, it loads the whole backbone: accepted (a partial load of the rest, as ImageNet weights are)
    converted = tmp_path / "R-18.pkl"
    convert_pretrained.main([str(pth), str(converted)])
    training.load(str(converted))
    assert training.last_load_report.backbone_share() == 1.0
    # a deliberate partial load (--allow-partial-weights: no floor) is logged, not refused
    partial = AVSCheckpointer(model)
    partial.load(str(pth))
    assert partial.last_load_report.loaded == []


def test_audio_conversion_is_what_model_audio_weights_loads(tmp_path):
    net, pth = _torchvision_pth(tmp_path, "resnet18")
    out = tmp_path / "audio-R-18.pkl"
    convert_pretrained.main([str(pth), str(out), "--audio"])
    cfg = setup_cfg(TINY, ["MODEL.DEVICE", "cpu", "MODEL.AUDIO.BASE_CHANNELS", "64", "MODEL.AUDIO.NORM", "BN",
                           "MODEL.AUDIO.WEIGHTS", str(out)])
    audio = build_audio_backbone(cfg)  # loads MODEL.AUDIO.WEIGHTS
    sd = net.state_dict()
    state = audio.state_dict()
    assert set(state) == {k for k in sd if not k.startswith("fc.")}
    for k, v in state.items():
        if k != "conv1.weight":
            assert torch.equal(v, sd[k]), k
    assert torch.allclose(state["conv1.weight"], sd["conv1.weight"].mean(1, keepdim=True))  # RGB stem -> mono

    stereo = build_audio_backbone(setup_cfg(TINY, ["MODEL.AUDIO.BASE_CHANNELS", "64", "MODEL.AUDIO.NORM", "BN",
                                                   "MODEL.AUDIO.IN_CHANNELS", "2", "INPUT.AUDIO.CHANNELS", "2"]))
    load_audio_backbone_weights(stereo, str(out))
    assert torch.allclose(stereo.conv1.weight[:, 1:], sd["conv1.weight"].mean(1, keepdim=True))


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    _, r50 = _torchvision_pth(tmp_path, "resnet50")
    state, block, depth = convert_pretrained.read_torchvision_resnet(str(r50))
    assert (block, depth) == ("bottleneck", 50)
    with pytest.raises(ValueError, match=rf"{r50} is a ResNet-50 \(Bottleneck blocks\).*audio backbone"):
        convert_pretrained.convert_audio(state, block, depth, str(r50))
    not_resnet = tmp_path / "vit.pth"
    torch.save({"encoder.layers.0.weight": torch.zeros(2)}, not_resnet)
    with pytest.raises(ValueError, match=rf"{not_resnet} is not a torchvision ResNet state dict"):
        convert_pretrained.read_torchvision_resnet(str(not_resnet))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 not a zip")
    with pytest.raises(SystemExit):
        convert_pretrained.main([str(garbage), str(tmp_path / "o.pkl")])
    assert f"cannot read {garbage}" in capsys.readouterr().err
    existing = tmp_path / "exists.pkl"
    existing.write_bytes(b"x")
    with pytest.raises(SystemExit):
        convert_pretrained.main([str(r50), str(existing)])
    assert "--overwrite" in capsys.readouterr().err


def test_model_only_checkpoint_drops_the_training_state_and_loads_strictly(tmp_path, capsys):
    cfg = setup_cfg(TINY, ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # AdamW moments: the bulk of a training checkpoint
    full = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "trainer": {"optimizer": optimizer.state_dict(), "iteration": 3},
                "iteration": 3}, full)
    out = tmp_path / "model_only.pth"
    convert_pretrained.main(["--model-only", str(full), str(out)])
    printed = capsys.readouterr().out
    size_in, size_out = full.stat().st_size / 2**20, out.stat().st_size / 2**20
    assert f"wrote {out}: {len(model.state_dict())} model tensors, {size_out:.1f} MiB ({full}: {size_in:.1f} MiB; " \
           "dropped iteration, trainer)" in printed
    assert size_out < 0.5 * size_in
    data = torch.load(out, map_location="cpu", weights_only=True)
    assert list(data) == ["model"]
    fresh = build_model(cfg)
    AVSCheckpointer(fresh, strict=True).load(str(out))  # strict: every tensor, nothing extra
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))

    _, r18 = _torchvision_pth(tmp_path, "resnet18")
    with pytest.raises(SystemExit):
        convert_pretrained.main(["--model-only", str(r18), str(tmp_path / "x.pth")])
    assert "looks like a torchvision state dict: convert it without --model-only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_pretrained.main(["--model-only", str(full), str(tmp_path / "x.pkl")])
    assert "name the output *.pth" in capsys.readouterr().err
