"""Aggregate training images/s of 1, 2, 4, 8 trials sharing one device, as Ray runs packed
trials (`--gpus-per-trial 0.25`): separate processes, each with its own net and data copy.

Each process trains the seed net on random 32x32 images for a fixed number of steps after a
warm-up; all start together (a barrier), and the aggregate is all their images over the wall
time from the barrier to the last one's end.

    python bench/packing.py                   # 1,2,4,8 trials on the GPU (on CPU: 1,2)

Last line: `packing: N trials AGG img/s (1 trial ONE img/s, ratio R)` for the largest N.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.multiprocessing as mp

from train_throughput import WARMUP_STEPS, our_loop  # the script beside this one
from tuning.config import TrialConfig
from tuning.data import Split
from tuning.training import pick_device


def trial(steps: int, batch_size: int, image_size: int | None, barrier, results) -> None:
    device = pick_device()
    torch.backends.cudnn.benchmark = True
    torch.set_num_threads(1)  # on CPU the processes share the cores; one each keeps it fair
    generator = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (8192, 3, 32, 32), dtype=torch.uint8, generator=generator),
                  torch.randint(0, 10, (8192,), generator=generator))  # fmt: skip
    cfg = TrialConfig.from_dict({"preset": "seed", "batch_size": batch_size, "image_size": image_size})
    run = our_loop(cfg, split, device, steps + WARMUP_STEPS)
    run(WARMUP_STEPS)
    barrier.wait()
    start = time.time()
    stats = run(steps)
    results.put((stats.images, start, time.time()))


def aggregate(trials: int, steps: int, batch_size: int, image_size: int | None) -> float:
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(trials), context.Queue()
    workers = [context.Process(target=trial, args=(steps, batch_size, image_size, barrier, results)) for _ in range(trials)]
    for worker in workers:
        worker.start()
    done = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    return sum(images for images, _, _ in done) / (max(end for *_, end in done) - min(start for _, start, _ in done))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", default=None, help="comma-separated counts (default: 1,2,4,8 on CUDA, 1,2 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per trial (default: 300 on CUDA, 20 on CPU)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    counts = [int(n) for n in (args.trials or ("1,2,4,8" if cuda else "1,2")).split(",")]
    steps = args.steps or (300 if cuda else 20)
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'} | seed net, batch {args.batch_size}, {steps} steps per trial")
    one = None
    for n in counts:
        agg = aggregate(n, steps, args.batch_size, args.image_size)
        one = one or agg
        print(f"{n} trials: {agg:10,.0f} img/s aggregate  ({agg / one:.2f}x one trial)", flush=True)
    print(f"packing: {counts[-1]} trials {agg:.0f} img/s (1 trial {one:.0f} img/s, ratio {agg / one:.2f})")


if __name__ == "__main__":
    main()
