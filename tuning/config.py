"""What one trial is: a frozen `TrialConfig`, built once from the dict Tune and Optuna pass.

The same object builds the model and the optimizer, becomes the MLflow params and is stored
in every checkpoint. `PARAMS` is the single table of what each key may hold; search-space
files are checked against it too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from model import DOWNSAMPLE_CHOICES, PRESETS, ModelConfig, preset

# The one metric the search optimises, and its direction.
METRIC = "val_acc"
MODE = "max"

LR_SCHEDULES = ("onecycle", "cosine", "step")
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class Param:
    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is not allowed
    high_open: bool = False
    choices: tuple[Any, ...] = ()
    optional: bool = False  # None is allowed (it means "the data's own value")
    help: str = ""

    def check(self, key: str, value: Any) -> Any:
        """Return `value` coerced to this param's type, or raise a ValueError naming `key`."""
        if value is None and self.optional:
            return None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{key}={value!r} must be true or false")
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key}={value!r} must be a number")
            if self.kind is int and value != int(value):
                raise ValueError(f"{key}={value!r} must be a whole number")
            value = self.kind(value)
            if not math.isfinite(value) or not self.in_range(value):
                raise ValueError(f"{key}={value!r} is out of range {self.describe_range()}")
            return value
        if value not in self.choices:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(map(str, self.choices))}")
        return value

    def in_range(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe_range(self) -> str:
        low = "-inf" if self.low is None else self.low
        high = "inf" if self.high is None else self.high
        return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


# Keys that describe the net; the rest describe how it is trained.
MODEL_KEYS = ("width_mult", "convs_per_stage", "batchnorm", "downsample", "input_dropout", "stage_dropout", "num_classes")

PARAMS: dict[str, Param] = {
    "preset": Param(str, choices=tuple(PRESETS), help="base architecture; the model keys below override it"),
    "width_mult": Param(float, 0, 16, low_open=True, help="multiplies every hidden width"),
    "convs_per_stage": Param(int, 0, 8, help="3x3 convs per stage before its downsampling"),
    "batchnorm": Param(bool, help="BatchNorm after every conv (off: conv biases instead)"),
    "downsample": Param(str, choices=DOWNSAMPLE_CHOICES, help="stride: 3x3 stride-2 conv; pool: conv + 2x2 max-pool"),
    "input_dropout": Param(float, 0, 1, high_open=True, help="dropout on the input image"),
    "stage_dropout": Param(float, 0, 1, high_open=True, help="dropout after each downsampling"),
    "num_classes": Param(int, 2, 100_000, help="classifier outputs (set from the data)"),
    "lr": Param(float, 0, 10, low_open=True, help="peak learning rate"),
    "momentum": Param(float, 0, 1, high_open=True, help="SGD momentum (Nesterov), or AdamW's beta1"),
    "weight_decay": Param(float, 0, 1, high_open=True, help="L2 penalty (decoupled for AdamW)"),
    "batch_size": Param(int, 1, 65_536, help="training batch size"),
    "epochs": Param(int, 1, 10_000, help="epochs; the lr schedule spans all of them"),
    "label_smoothing": Param(float, 0, 1, high_open=True, help="cross-entropy label smoothing"),
    "lr_schedule": Param(str, choices=LR_SCHEDULES, help="lr over the run, stepped every batch"),
    "optimizer": Param(str, choices=OPTIMIZERS, help="sgd (Nesterov) or adamw"),
    "seed": Param(int, 0, 2**31 - 1, help="seeds init, shuffling, augmentation and dropout"),
    "image_size": Param(int, 8, 1024, optional=True, help="train at N x N (upsampled on the device)"),
    "augment": Param(bool, help="random crop (pad 4) and horizontal flip"),
    "compile": Param(bool, help="torch.compile the net: slower first epoch, faster steps; for long trials"),
}


@dataclass(frozen=True)
class TrialConfig:
    """One trial's settings. Build it with `from_dict`, which fills model keys from the preset."""

    preset: str = "seed"
    # Model: defaults are the seed preset's; from_dict takes them from the chosen preset.
    width_mult: float = 1.0
    convs_per_stage: int = 1
    batchnorm: bool = True
    downsample: str = "stride"
    input_dropout: float = 0.0
    stage_dropout: float = 0.0
    num_classes: int = 10
    # Optimisation. Defaults reach about 70% val accuracy in 3 CPU epochs with the seed net.
    optimizer: str = "sgd"  # SGD with Nesterov momentum: the paper's choice, and fast with batchnorm
    lr: float = 0.2  # the one-cycle peak; the schedule warms up to it, so it can be high
    momentum: float = 0.9
    weight_decay: float = 5e-4  # the usual CIFAR value for SGD; AdamW wants ~0.05
    batch_size: int = 256  # large enough to keep a GPU busy, small enough for a few epochs to count
    epochs: int = 10
    label_smoothing: float = 0.0
    lr_schedule: str = "onecycle"  # most accuracy for a short, fixed budget
    seed: int = 0
    image_size: int | None = None  # None trains at the data's size; 64 upsamples CIFAR like the notebook
    augment: bool = True  # random crop (pad 4) and horizontal flip
    # Off: compiling costs tens of seconds per new net shape (cached on disk per node after
    # that), which only trials of many epochs win back.
    compile: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, PARAMS[f.name].check(f.name, getattr(self, f.name)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrialConfig:
        unknown = sorted(set(values) - set(PARAMS))
        if unknown:
            raise ValueError(f"unknown trial config key {unknown[0]!r}; known keys: {', '.join(PARAMS)}")
        name = PARAMS["preset"].check("preset", values.get("preset", cls.preset))
        base = PRESETS[name]
        preset_values = {key: getattr(base, key) for key in MODEL_KEYS}
        return cls(**{**preset_values, **values, "preset": name})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self) -> ModelConfig:
        return preset(self.preset, **{key: getattr(self, key) for key in MODEL_KEYS})
