"""The all-convolutional net (Springenberg et al. 2014, "Striving for Simplicity").

Every layer is a convolution: downsampling is a stride-2 conv (or, for the paper's ConvPool
comparison, a conv followed by max-pooling) and the classifier is a conv to `num_classes`
channels followed by global average pooling. The module is plain PyTorch and knows nothing
of training or tuning.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

Downsample = Literal["stride", "pool"]
DOWNSAMPLE_CHOICES: tuple[str, ...] = ("stride", "pool")


@dataclass(frozen=True)
class ModelConfig:
    # Channels of each stage. A stage runs `convs_per_stage` 3x3 convs at full resolution,
    # then halves the resolution with a downsampling layer at the same width.
    stage_widths: tuple[int, ...]
    convs_per_stage: int
    # Convs after the last stage, before the classifier: a 3x3 'valid' conv first (as in
    # All-CNN-C), then 1x1 convs.
    head_widths: tuple[int, ...] = ()
    width_mult: float = 1.0  # scales every hidden width; the classifier keeps num_classes
    batchnorm: bool = True  # off means conv biases on and no BatchNorm modules
    downsample: Downsample = "stride"
    input_dropout: float = 0.0
    stage_dropout: float = 0.0  # after each downsampling, as in the paper
    num_classes: int = 10
    in_channels: int = 3

    def __post_init__(self) -> None:
        checks = {
            "stage_widths": len(self.stage_widths) > 0 and all(w >= 1 for w in self.stage_widths),
            "convs_per_stage": self.convs_per_stage >= 0,
            "head_widths": all(w >= 1 for w in self.head_widths),
            "width_mult": 0 < self.width_mult <= 16,
            "downsample": self.downsample in DOWNSAMPLE_CHOICES,
            "input_dropout": 0 <= self.input_dropout < 1,
            "stage_dropout": 0 <= self.stage_dropout < 1,
            "num_classes": self.num_classes >= 2,
            "in_channels": self.in_channels >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"model config: {key}={getattr(self, key)!r} is out of range")
        if not isinstance(self.batchnorm, bool):
            raise ValueError(f"model config: batchnorm={self.batchnorm!r} must be true or false")

    def scaled(self, width: int) -> int:
        return max(1, round(width * self.width_mult))


PRESETS: dict[str, ModelConfig] = {
    # The lecture notebook's net: 16-32-64 channels, batchnorm, stride-2 convs, GAP head.
    "seed": ModelConfig(stage_widths=(16, 32, 64), convs_per_stage=1),
    # Springenberg et al. 2014, All-CNN-C: no batchnorm, dropout 0.2 on the input and 0.5
    # after each downsampling; 1,369,738 parameters.
    "all-cnn-c": ModelConfig(
        stage_widths=(96, 192),
        convs_per_stage=2,
        head_widths=(192, 192),
        batchnorm=False,
        input_dropout=0.2,
        stage_dropout=0.5,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def conv_block(cfg: ModelConfig, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=not cfg.batchnorm)]
    if cfg.batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class AllConvNet(nn.Module):
    """Takes float images in [0, 1], NCHW, and returns class logits.

    The input normalisation (the training split's per-channel mean and std) lives in buffers,
    so a saved model carries it and needs nothing else to be used.
    """

    def __init__(self, cfg: ModelConfig, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        self.cfg = cfg
        mean = mean or (0.0,) * cfg.in_channels
        std = std or (1.0,) * cfg.in_channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

        self.input_dropout = nn.Dropout(cfg.input_dropout)
        c_in = cfg.in_channels
        self.stages = nn.ModuleList()
        for width in cfg.stage_widths:
            c_out = cfg.scaled(width)
            stage: list[nn.Module] = []
            for _ in range(cfg.convs_per_stage):
                stage.append(conv_block(cfg, c_in, c_out, 3))
                c_in = c_out
            if cfg.downsample == "stride":
                stage.append(conv_block(cfg, c_in, c_out, 3, stride=2))
            else:  # the ConvPool variant keeps the same conv, so only the pooling differs
                stage += [conv_block(cfg, c_in, c_out, 3), nn.MaxPool2d(2)]
            stage.append(nn.Dropout(cfg.stage_dropout))
            self.stages.append(nn.Sequential(*stage))
            c_in = c_out
        head: list[nn.Module] = []
        for i, width in enumerate(cfg.head_widths):
            c_out = cfg.scaled(width)
            head.append(conv_block(cfg, c_in, c_out, 3 if i == 0 else 1, padding=0))
            c_in = c_out
        # No ReLU after the classifier conv: logits must be free to go negative.
        head += [nn.Conv2d(c_in, cfg.num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.head = nn.Sequential(*head)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout((images - self.mean) / self.std)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
