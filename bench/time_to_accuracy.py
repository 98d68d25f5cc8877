"""Seconds for the seed net to reach the lecture notebook's 80.67% CIFAR-10 test accuracy
(the notebook: 50 epochs, 41.5 minutes on one GPU).

Trains one config with `tuning.training.fit` on the real data and scores the test split after
every epoch (timing only; searches never look at the test split). The clock covers what a
trial does: moving the data to the device, building the net, training and validation; the
per-epoch test scoring is left out.

    python bench/time_to_accuracy.py --dataset folder --data DIR [--epochs 30]

Last line: `time_to_accuracy: S s to 80.67% (notebook 2490 s, ratio R)`, or `not reached`.
"""

from __future__ import annotations

import argparse
import time

import torch

from tuning.config import TrialConfig
from tuning.data import add_data_arguments, trial_data_from_args
from tuning.training import fit, pick_device, test_accuracy

NOTEBOOK_ACCURACY = 0.8067
NOTEBOOK_SECONDS = 41.5 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=int, default=30, help="the one-cycle schedule's length (default: 30)")
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=None, help="64: the notebook's upscaling")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop after this much training (a CPU run)")
    args = parser.parse_args()
    data = trial_data_from_args(args)
    device = pick_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = TrialConfig.from_dict({"preset": "seed", "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                                 "image_size": args.image_size, "num_classes": len(data.classes)})  # fmt: skip
    print(f"device {device} | {len(data.train)} train images | {cfg}")
    clock, reached = 0.0, None
    start = time.perf_counter()
    for metrics, payload in fit(cfg, data, device):
        clock += time.perf_counter() - start
        _, accuracy = test_accuracy(payload, data, device)  # outside the clock
        print(f"epoch {metrics['epoch']:3d}  {clock:7.1f} s  val {metrics['val_acc']:.2%}  test {accuracy:.2%}", flush=True)
        if reached is None and accuracy >= NOTEBOOK_ACCURACY:
            reached = clock
            break
        if args.max_seconds and clock > args.max_seconds:
            break
        start = time.perf_counter()
    if reached is None:
        print(f"time_to_accuracy: not reached in {clock:.0f} s (notebook {NOTEBOOK_SECONDS:.0f} s, ratio -)")
    else:
        print(f"time_to_accuracy: {reached:.1f} s to {NOTEBOOK_ACCURACY:.2%} (notebook {NOTEBOOK_SECONDS:.0f} s, "
              f"ratio {reached / NOTEBOOK_SECONDS:.3f})")


if __name__ == "__main__":
    main()
