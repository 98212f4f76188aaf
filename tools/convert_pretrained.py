#!/usr/bin/env python
"""Convert a torchvision ResNet state dict (``.pth``) into the files cpm_d2 loads.

Visual backbone (``MODEL.WEIGHTS``): torchvision ResNet-18/34/50/101/152 -> detectron2 names under
``backbone.`` (``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``, ``layerN`` -> ``res{N+1}``,
``bnK`` -> ``convK.norm``, ``downsample.0/1`` -> ``shortcut``/``shortcut.norm``; ``fc`` and the
BatchNorm counters dropped), written as a detectron2 ``.pkl``. The keys are the model's own, so
loading needs no name matching and the load table shows exactly what came from the file:

    python tools/convert_pretrained.py resnet50-0676ba61.pth R-50.pkl
    python tools/train_net.py --config-file configs/avss_r50.yaml MODEL.WEIGHTS R-50.pkl

The model must then use torchvision's conventions, as ``configs/Base-AVS.yaml`` does: RGB input
with ``MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]`` / ``PIXEL_STD [58.395, 57.12, 57.375]``,
``MODEL.RESNETS.STRIDE_IN_1X1 False``, ``MODEL.RESNETS.DEPTH`` as printed, ``NORM FrozenBN`` (or
``BN``); a ResNet-18/34 also needs ``MODEL.RESNETS.RES2_OUT_CHANNELS 64``.

Audio backbone (``MODEL.AUDIO.WEIGHTS``, ``--audio``): torchvision ResNet-18/34 (BasicBlock) ->
``audio_backbone.``-prefixed torchvision names without ``fc``, as a ``.pkl``. The RGB stem stays
3-channel: the audio loader averages it to ``MODEL.AUDIO.IN_CHANNELS`` (mono or stereo).

    python tools/convert_pretrained.py resnet18-f37072fd.pth audio-R-18.pkl --audio
    ... MODEL.AUDIO.WEIGHTS audio-R-18.pkl MODEL.AUDIO.DEPTH 18 MODEL.AUDIO.BASE_CHANNELS 64

Model-only checkpoint (``--model-only``): a cpm_d2 training checkpoint (``model_final.pth``, which also
holds the optimizer, scheduler, iteration and random states for ``--resume``) -> its model tensors
alone, as a ``.pth`` that ``MODEL.WEIGHTS`` (``--eval-only``, fine-tuning) and ``AVSPredictor`` load
strictly; both file sizes are printed:

    python tools/convert_pretrained.py --model-only output/model_final.pth output/model_only.pth

Nothing is downloaded: get the ``.pth`` yourself (e.g. ``torchvision.models.resnet50(weights=...)``
on a machine with internet access, then ``torch.save(model.state_dict(), path)``).
"""
import argparse
import os
import pickle
import re
import sys
from collections import OrderedDict


__all__ = ["read_torchvision_resnet", "convert_visual", "convert_audio", "read_model_only", "main"]

# blocks per stage -> depth, for BasicBlock and Bottleneck ResNets
_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}
_KEY = re.compile(r"^(conv1\.weight|bn1\.(weight|bias|running_mean|running_var|num_batches_tracked)|fc\.(weight|bias)|"
                  r"layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.\w+|downsample\.[01]\.\w+))$")


def _torch_load(path, what):
    """``torch.load`` of ``path`` (tensors only); a missing or unreadable file raises naming it as ``what``."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path} as {what}: {type(e).__name__}: {e}") from e


def read_torchvision_resnet(path):
    """-> (OrderedDict of tensors, block type "basic"/"bottleneck", depth). Errors name ``path``."""
    import torch

    data = _torch_load(path, "a torch state dict")
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    elif isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path} holds no state dict (got {type(data).__name__})")
    if all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    state = OrderedDict((k, v) for k, v in data.items() if isinstance(v, torch.Tensor))
    if "conv1.weight" not in state or "layer1.0.conv1.weight" not in state:
        raise ValueError(f"{path} is not a torchvision ResNet state dict: no 'conv1.weight' / "
                         f"'layer1.0.conv1.weight' (first keys: {list(data)[:5]})")
    foreign = [k for k in state if not _KEY.match(k)]
    if foreign:
        raise ValueError(f"{path} is not a plain torchvision ResNet state dict: unexpected keys {foreign[:5]}"
                         f"{' ...' if len(foreign) > 5 else ''}")
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    counts = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{s}.")}) for s in range(1, 5))
    depth = _DEPTHS.get((block, counts))
    if depth is None:
        raise ValueError(f"{path}: a {block}-block ResNet with {counts} blocks per stage is not ResNet-18/34/50/101/152")
    return state, block, depth


def _numpy(state):
    return OrderedDict((k, v.detach().cpu().numpy()) for k, v in state.items())


def convert_visual(state):
    """torchvision ResNet names -> detectron2 ``backbone.*`` names (fc and BN counters dropped)."""
    out = OrderedDict()
    for k, v in state.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        name = k if k.startswith("layer") else "stem." + k
        for s in range(1, 5):
            name = name.replace(f"layer{s}.", f"res{s + 1}.")
        for i in range(1, 4):
            name = name.replace(f"bn{i}.", f"conv{i}.norm.")
        name = name.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
        out["backbone." + name] = v
    return out


def convert_audio(state, block, depth, path="<input>"):
    """torchvision ResNet-18/34 -> ``audio_backbone.*`` torchvision names (fc dropped)."""
    if block != "basic":
        raise ValueError(f"{path} is a ResNet-{depth} (Bottleneck blocks); the audio backbone is a BasicBlock "
                         "ResNet-18/34 (MODEL.AUDIO.DEPTH): convert resnet18 or resnet34 weights for --audio")
    return OrderedDict(("audio_backbone." + k, v) for k, v in state.items() if not k.startswith("fc."))


def read_model_only(path):
    """A cpm_d2 / detectron2 training checkpoint -> (OrderedDict of its model tensors, the other keys dropped)."""
    import torch

    data = _torch_load(path, "a torch checkpoint")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        hint = (" (it looks like a torchvision state dict: convert it without --model-only)"
                if isinstance(data, dict) and "conv1.weight" in data else "")
        raise ValueError(f"{path} is not a training checkpoint: it has no 'model' dict of tensors{hint}")
    state = OrderedDict((k, v) for k, v in data["model"].items() if isinstance(v, torch.Tensor))
    if not state:
        raise ValueError(f"{path}: its 'model' entry holds no tensor")
    return state, sorted(k for k in data if k != "model")


def _write_model_only(args, parser):
    import torch

    if not args.output.endswith(".pth"):
        parser.error(f"--model-only writes a torch .pth file; name the output *.pth: {args.output}")
    try:
        state, dropped = read_model_only(args.input)
    except (OSError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    tmp = args.output + ".tmp"
    torch.save({"model": state}, tmp)
    os.replace(tmp, args.output)
    size_in, size_out = os.path.getsize(args.input), os.path.getsize(args.output)
    print(f"wrote {args.output}: {len(state)} model tensors, {size_out / 2**20:.1f} MiB "
          f"({args.input}: {size_in / 2**20:.1f} MiB; dropped {', '.join(dropped) or 'nothing'})")
    print(f"use: MODEL.WEIGHTS {args.output} (tools/train_net.py --eval-only, AVSPredictor)")
    return args.output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="torchvision ResNet state dict (.pth); with --model-only a training checkpoint")
    parser.add_argument("output", help="file to write (.pkl; .pth with --model-only)")
    parser.add_argument("--audio", action="store_true", help="write the MODEL.AUDIO.WEIGHTS form (ResNet-18/34)")
    parser.add_argument("--model-only", action="store_true",
                        help="write the model tensors of a training checkpoint alone (a .pth MODEL.WEIGHTS loads)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)

    if args.model_only and args.audio:
        parser.error("--model-only and --audio are different conversions: pass one")
    if os.path.exists(args.output) and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it")
    if args.model_only:
        return _write_model_only(args, parser)

    if not args.output.endswith(".pkl"):
        parser.error(f"output must end in .pkl (detectron2 reads .pkl files as converted weights): {args.output}")
    try:
        state, block, depth = read_torchvision_resnet(args.input)
        if args.audio:
            converted = convert_audio(state, block, depth, args.input)
            author = f"torchvision ResNet-{depth} (audio backbone) via cpm_d2 tools/convert_pretrained.py"
        else:
            converted = convert_visual(state)
            author = f"torchvision ResNet-{depth} via cpm_d2 tools/convert_pretrained.py"
    except (OSError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    payload = {"model": _numpy(converted), "__author__": author, "matching_heuristics": False}
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(payload, f)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}: {len(converted)} tensors from {args.input} (ResNet-{depth})")
    if args.audio:
        print(f"use: MODEL.AUDIO.WEIGHTS {args.output} MODEL.AUDIO.DEPTH {depth} MODEL.AUDIO.BASE_CHANNELS 64")
    else:
        extra = " MODEL.RESNETS.RES2_OUT_CHANNELS 64" if depth in (18, 34) else ""
        print(f"use: MODEL.WEIGHTS {args.output} MODEL.RESNETS.DEPTH {depth}{extra} MODEL.RESNETS.STRIDE_IN_1X1 False "
              "(torchvision RGB mean/std as in configs/Base-AVS.yaml)")
    return args.output


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
