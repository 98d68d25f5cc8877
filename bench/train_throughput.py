"""Training images/s of our trial loop against a plain PyTorch loop of the same net.

The plain loop is what one would write first: a Dataset with per-image torchvision transforms
(random crop with padding 4, horizontal flip), a DataLoader, NCHW fp32 on the host side.
Ours is `tuning.training.train_one_epoch` over `tuning.data.train_batches`: data resident on
the device as uint8, augmentation there, channels_last, bf16 autocast on CUDA.

    python bench/train_throughput.py                        # random images, seed net
    python bench/train_throughput.py --dataset folder --data DIR --nets seed,all-cnn-c

Last line: `train_throughput: OURS img/s (plain loop PLAIN img/s, ratio R)` for the first net.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from model import AllConvNet, preset
from tuning.config import TrialConfig
from tuning.data import CROP_PADDING, Split, load_data, make_trial_data, train_batches
from tuning.training import EpochStats, build_model, build_optimizer, build_scheduler, pick_device, train_one_epoch

Batch = tuple[torch.Tensor, torch.Tensor]
WARMUP_STEPS = 5  # cudnn autotuning and the allocator, outside the timed window


def endless(one_epoch: Callable[[], Iterable[Batch]]) -> Iterator[Batch]:
    """Batches epoch after epoch, for as many timed steps as asked."""
    while True:
        yield from one_epoch()


class PlainDataset(Dataset):
    def __init__(self, split: Split, mean, std, image_size: int | None = None):
        self.split = split
        resize = [v2.Resize(image_size, antialias=True)] if image_size else []  # the notebook's per-image upscaling
        self.transform = v2.Compose([
            *resize,
            v2.RandomCrop(image_size or split.images.shape[-1], padding=CROP_PADDING),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.transform(self.split.images[i]), self.split.labels[i]


def plain_loop_images_per_s(cfg: TrialConfig, split: Split, steps: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = AllConvNet(cfg.model_config()).to(device)  # normalisation is done by the transform
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps + WARMUP_STEPS)
    loader = DataLoader(PlainDataset(split, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], cfg.image_size), batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    batches = endless(lambda: loader)
    images, start = 0, 0.0
    for step in range(steps + WARMUP_STEPS):
        if step == WARMUP_STEPS:
            sync(device)
            start, images = time.perf_counter(), 0
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        images += len(y)
    sync(device)
    return images / (time.perf_counter() - start)


def our_loop(cfg: TrialConfig, split: Split, device: torch.device, total_steps: int, bf16: bool = True) -> Callable[[int], EpochStats]:
    """Our trial's loop, set up: `run(n)` trains n more steps."""
    on_device = split.to(device)
    model = build_model(cfg, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=total_steps)
    generator = torch.Generator(device=device).manual_seed(0)

    batches = endless(lambda: train_batches(on_device, cfg.batch_size, generator, True, cfg.image_size))
    return lambda n: train_one_epoch(model, optimizer, scheduler, itertools.islice(batches, n), mixed_precision=bf16)


def our_loop_images_per_s(cfg: TrialConfig, split: Split, steps: int, device: torch.device, bf16: bool = True) -> float:
    run = our_loop(cfg, split, device, steps + WARMUP_STEPS, bf16)
    run(WARMUP_STEPS)
    return run(steps).images_per_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="folder", choices=("cifar10", "folder"))
    parser.add_argument("--data", default=None, help="real images to read; default: 10,240 random 32x32 images")
    parser.add_argument("--nets", default=None, help="presets, comma-separated (default: seed; on CUDA also all-cnn-c)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per loop (default: 40 on CPU, 200 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=None, help="train at N x N (64: the notebook's setting)")
    args = parser.parse_args()

    device = pick_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    steps = args.steps or (200 if device.type == "cuda" else 40)
    nets = (args.nets or ("seed,all-cnn-c" if device.type == "cuda" else "seed")).split(",")
    if args.data:
        split = make_trial_data(load_data(args.dataset, args.data)).train
        source = f"{args.data} ({len(split)} training images)"
    else:
        generator = torch.Generator().manual_seed(0)
        split = Split(torch.randint(0, 256, (10_240, 3, 32, 32), dtype=torch.uint8, generator=generator), torch.randint(0, 10, (10_240,), generator=generator))
        source = "10,240 random 32x32 images"
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else torch.get_num_threads()} threads) | {source} | batch {args.batch_size} | {steps} steps")

    results = []
    for net in nets:
        preset(net)  # fail fast on a misspelt name
        cfg = TrialConfig.from_dict({"preset": net, "batch_size": args.batch_size, "image_size": args.image_size})
        # Alternate the two loops twice and keep each one's best, so neither pays for a cold start.
        plain = max(plain_loop_images_per_s(cfg, split, steps, device) for _ in range(2))
        ours = max(our_loop_images_per_s(cfg, split, steps, device) for _ in range(2))
        line = (f"{net:10s} ours {ours:10,.0f} img/s   plain {plain:10,.0f} img/s   ratio {ours / plain:.2f}"
                f"   45k-image epoch {45_000 / ours:.2f} s")  # fmt: skip
        if device.type == "cuda":
            fp32 = our_loop_images_per_s(cfg, split, steps, device, bf16=False)
            line += f"   ours fp32 {fp32:10,.0f} img/s   bf16/fp32 {ours / fp32:.2f}"
        print(line, flush=True)
        results.append((net, ours, plain))
    net, ours, plain = results[0]
    print(f"train_throughput: {ours:.0f} img/s ({net} plain loop {plain:.0f} img/s, ratio {ours / plain:.2f})")


if __name__ == "__main__":
    main()
