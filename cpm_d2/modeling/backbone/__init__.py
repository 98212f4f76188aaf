from .audio_resnet import AUDIO_BACKBONE_REGISTRY, AudioResNet, build_audio_backbone, load_audio_backbone_weights

__all__ = ["AUDIO_BACKBONE_REGISTRY", "AudioResNet", "build_audio_backbone", "load_audio_backbone_weights"]
