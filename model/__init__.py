"""The all-convolutional net, as a plain PyTorch module with a frozen config."""

from model.allconv import DOWNSAMPLE_CHOICES, PRESETS, AllConvNet, ModelConfig, parameter_count, preset

__all__ = ["AllConvNet", "DOWNSAMPLE_CHOICES", "ModelConfig", "PRESETS", "parameter_count", "preset"]
