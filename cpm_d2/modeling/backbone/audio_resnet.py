"""Audio backbone: a BasicBlock ResNet over the log-magnitude spectrogram.

AudioResNet: input (B, Ca, T, F) log-magnitude spectrogram, Ca in {1, 2}. Layout and parameter
names follow torchvision's ResNet-18/34 (``conv1``, ``bn1``, ``layer1..4`` with BasicBlock), so an
ImageNet ``resnet18``/``resnet34`` ``.pth`` can initialise it (MODEL.AUDIO.WEIGHTS; the RGB stem
is averaged over colour and repeated over Ca). Strides: stem /4, res2 /4, res3 /8, res4 /16,
res5 /32 over (T, F).
"""
import logging
import pickle
from typing import Dict

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.utils.registry import Registry


__all__ = ["AUDIO_BACKBONE_REGISTRY", "AudioResNet", "build_audio_backbone", "load_audio_backbone_weights"]

logger = logging.getLogger(__name__)

AUDIO_BACKBONE_REGISTRY = Registry("AUDIO_BACKBONE")
AUDIO_BACKBONE_REGISTRY.__doc__ = """
Audio backbones map a spectrogram (B, Ca, T, F) to a dict of feature maps {"res2".."res5"} and
expose ``output_shape()`` like detectron2 backbones. Built from cfg.MODEL.AUDIO.BACKBONE_NAME.
"""

_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


@AUDIO_BACKBONE_REGISTRY.register()
class AudioResNet(nn.Module):
    """ResNet-18/34 (BasicBlock) over a (B, Ca, T, F) spectrogram -> {"res2".."res5"}."""

    @configurable
    def __init__(self, *, depth: int = 18, in_channels: int = 1, base_channels: int = 64, norm: str = "BN"):
        super().__init__()
        if depth not in _BLOCKS:
            raise ValueError(f"MODEL.AUDIO.DEPTH must be 18 or 34, got {depth}")
        if in_channels not in (1, 2):
            raise ValueError(f"MODEL.AUDIO.IN_CHANNELS must be 1 or 2, got {in_channels}")
        self.in_channels = in_channels

        def norm_layer(c):
            return get_norm(norm, c) if norm else nn.Identity()

        self.conv1 = nn.Conv2d(in_channels, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(base_channels)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = base_channels
        self._out_shapes = {}
        for i, n_blocks in enumerate(_BLOCKS[depth]):
            planes = base_channels * 2 ** i
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                           norm_layer(planes))
            blocks = [BasicBlock(inplanes, planes, stride, downsample, norm_layer=norm_layer)]
            blocks += [BasicBlock(planes, planes, norm_layer=norm_layer) for _ in range(n_blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
            self._out_shapes[f"res{i + 2}"] = ShapeSpec(channels=planes, stride=4 * 2 ** i)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @classmethod
    def from_config(cls, cfg):
        if cfg.MODEL.AUDIO.IN_CHANNELS != cfg.INPUT.AUDIO.CHANNELS:
            raise ValueError(
                f"MODEL.AUDIO.IN_CHANNELS ({cfg.MODEL.AUDIO.IN_CHANNELS}) must equal "
                f"INPUT.AUDIO.CHANNELS ({cfg.INPUT.AUDIO.CHANNELS})"
            )
        return {
            "depth": cfg.MODEL.AUDIO.DEPTH,
            "in_channels": cfg.MODEL.AUDIO.IN_CHANNELS,
            "base_channels": cfg.MODEL.AUDIO.BASE_CHANNELS,
            "norm": cfg.MODEL.AUDIO.NORM,
        }

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return dict(self._out_shapes)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected audio (B, {self.in_channels}, T, F) (MODEL.AUDIO.IN_CHANNELS = {self.in_channels}), "
                             f"got {tuple(x.shape)}")
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = {}
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            out[f"res{i + 2}"] = x
        return out


def build_audio_backbone(cfg) -> nn.Module:
    """Build cfg.MODEL.AUDIO.BACKBONE_NAME and load MODEL.AUDIO.WEIGHTS when given."""
    model = AUDIO_BACKBONE_REGISTRY.get(cfg.MODEL.AUDIO.BACKBONE_NAME)(cfg)
    if cfg.MODEL.AUDIO.WEIGHTS:
        load_audio_backbone_weights(model, cfg.MODEL.AUDIO.WEIGHTS)
    return model


def _read_state_dict(path):
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    else:
        data = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    elif isinstance(data, dict) and "state_dict" in data:
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ValueError(f"MODEL.AUDIO.WEIGHTS {path} does not hold a state dict (a dict name -> tensor, "
                         f"or one under 'model' or 'state_dict'); got a {type(data).__name__}")
    return {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for k, v in data.items()}


def load_audio_backbone_weights(model: AudioResNet, path: str):
    """Load a torchvision-layout ResNet-18/34 state dict into ``model`` (non-strict).

    Prefixes ``audio_backbone.`` / ``module.`` are stripped; ``fc.*`` is dropped; a 3-channel
    ``conv1`` is averaged over its input channels and repeated to Ca. Shape mismatches raise.
    """
    try:
        state = _read_state_dict(path)
    except (OSError, pickle.UnpicklingError, RuntimeError) as e:
        raise ValueError(f"cannot read MODEL.AUDIO.WEIGHTS {path}: {e}") from e
    clean = {}
    for k, v in state.items():
        for prefix in ("module.", "audio_backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("fc."):
            continue
        clean[k] = v
    w = clean.get("conv1.weight")
    if w is not None and w.shape[1] != model.in_channels:
        clean["conv1.weight"] = w.mean(1, keepdim=True).repeat(1, model.in_channels, 1, 1)
    own = model.state_dict()
    bad = [k for k, v in clean.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"MODEL.AUDIO.WEIGHTS {path}: shape mismatch for {bad[:5]} (check MODEL.AUDIO.DEPTH / BASE_CHANNELS)")
    missing, unexpected = model.load_state_dict({k: v for k, v in clean.items() if k in own}, strict=False)
    logger.info(f"Loaded audio backbone weights from {path}; missing: {list(missing)}; "
                f"ignored: {[k for k in clean if k not in own]}")
