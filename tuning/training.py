"""One trial of training, free of Ray: build, train an epoch, evaluate, checkpoint.

`fit` runs a trial epoch by epoch and yields each epoch's metrics with the state to checkpoint;
the command line (tuning/train.py) and the Ray trainable (tuning/trainable.py) both drive it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model import AllConvNet
from tuning.config import METRIC, TrialConfig
from tuning.data import Split, TrialData, atomic_write, eval_batches, train_batches

EVAL_BATCH_SIZE = 1024  # no activations are kept for backward, so evaluation can take big batches
CHECKPOINT_FILE = "checkpoint.pt"


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or altered: it is never loaded."""


@dataclass(frozen=True)
class EpochStats:
    train_loss: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


@dataclass(frozen=True)
class EvalStats:
    loss: float
    accuracy: float


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    # bf16 needs no loss scaling and is what the tensor cores are fastest at; CPUs stay in fp32.
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(cfg: TrialConfig, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> AllConvNet:
    torch.manual_seed(cfg.seed)
    return AllConvNet(cfg.model_config(), mean, std).to(device, memory_format=torch.channels_last)


def build_optimizer(model: nn.Module, cfg: TrialConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrialConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch, over the trial's whole budget of `cfg.epochs`."""
    total = cfg.epochs * steps_per_epoch
    if cfg.lr_schedule == "onecycle":
        # pct_start 0.25: a short warm-up lets the high peak lr work from the first epoch.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total, pct_start=0.25, cycle_momentum=False
        )
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    # step: the paper's schedule, x0.1 at 50% and 75% of the budget
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[total // 2, total * 3 // 4], gamma=0.1)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    label_smoothing: float = 0.0,
    mixed_precision: bool = True,
) -> EpochStats:
    """Trains on every batch; the loss is summed on the device and read once, at the end.

    `mixed_precision` runs the forward pass in bf16 on CUDA (False: fp32, for comparison).
    """
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    images = 0
    start = time.perf_counter()
    for x, y in batches:
        with autocast(device, mixed_precision):
            loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach().float() * len(y)
        images += len(y)
    train_loss = loss_sum.item() / max(images, 1)  # the epoch's one host sync
    seconds = time.perf_counter() - start
    if not math.isfinite(train_loss):
        raise DivergedError(f"training loss is {train_loss} (lr {scheduler.get_last_lr()[0]:.4g})")
    return EpochStats(train_loss, images, seconds)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> EvalStats:
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = 0
    for x, y in batches:
        with autocast(device):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
    return EvalStats(loss=loss_sum.item() / count, accuracy=correct.item() / count)


def evaluate_split(model: nn.Module, split: Split, image_size: int | None) -> EvalStats:
    return evaluate(model, eval_batches(split, EVAL_BATCH_SIZE, image_size))


def test_accuracy(payload: dict[str, Any], data: TrialData, device: torch.device) -> tuple[AllConvNet, float]:
    """A checkpoint's model, and its accuracy on the test split."""
    cfg = TrialConfig.from_dict(payload["config"])
    model = build_model(cfg, data.mean, data.std, device)
    model.load_state_dict(payload["model"])
    return model, evaluate_split(model, data.test.to(device), cfg.image_size).accuracy


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(directory: str | Path, payload: dict[str, Any]) -> Path:
    """checkpoint.pt and its SHA-256 beside it, each written whole or not at all."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    blob = buffer.getvalue()
    path = Path(directory) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(blob))
    atomic_write(path.with_suffix(".sha256"), lambda f: f.write(hashlib.sha256(blob).hexdigest().encode()))
    return path


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The checkpoint in `directory`, after checking it is the one that was written."""
    path = Path(directory) / CHECKPOINT_FILE
    try:
        blob = path.read_bytes()
        expected = path.with_suffix(".sha256").read_text().strip()
    except OSError as err:
        raise CorruptCheckpointError(f"checkpoint {path} is missing or unreadable ({err.strerror})") from err
    if hashlib.sha256(blob).hexdigest() != expected:
        raise CorruptCheckpointError(f"checkpoint {path} is truncated or corrupt (its SHA-256 does not match)")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- a whole trial


def epoch_seed(cfg: TrialConfig, epoch: int) -> int:
    """Each epoch's randomness depends only on (seed, epoch), so a resumed trial replays exactly."""
    return cfg.seed * 100_003 + epoch


def fit(
    cfg: TrialConfig, data: TrialData, device: torch.device, checkpoint: dict[str, Any] | None = None
) -> Iterator[tuple[dict[str, float], dict[str, Any]]]:
    """Trains `cfg` from scratch, or from `checkpoint`'s next epoch, to `cfg.epochs`.

    Yields (metrics, checkpoint payload) after every epoch.
    """
    train, val = data.train.to(device), data.val.to(device)
    model = build_model(cfg, data.mean, data.std, device)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    # The compiled net shares the model's parameters; checkpoints keep the plain state dict.
    # Inductor's on-disk caches (on by default, in the node's temp dir) let later trials on a
    # node reuse the kernels an earlier trial of the same shapes compiled.
    runner = torch.compile(model) if cfg.compile else model
    first_epoch = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        first_epoch = checkpoint["epoch"]

    for epoch in range(first_epoch, cfg.epochs):
        torch.manual_seed(epoch_seed(cfg, epoch))  # dropout
        generator = torch.Generator(device=device).manual_seed(epoch_seed(cfg, epoch))
        batches = train_batches(train, cfg.batch_size, generator, cfg.augment, cfg.image_size)
        stats = train_one_epoch(runner, optimizer, scheduler, batches, cfg.label_smoothing)
        val_stats = evaluate_split(runner, val, cfg.image_size)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": stats.train_loss,
            "val_loss": val_stats.loss,
            METRIC: val_stats.accuracy,
            "lr": scheduler.get_last_lr()[0],
            "images_per_s": stats.images_per_s,
            "epoch_seconds": stats.seconds,
        }
        payload = {
            "epoch": epoch + 1,
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "metrics": metrics,
            "classes": list(data.classes),
        }
        yield metrics, payload
