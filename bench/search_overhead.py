"""Per-trial overhead of our search against a bare Ray Tune run of sleep trials.

Both run N trials in the same Ray instance (2 CPUs, 1 CPU per trial, so 2 slots). Overhead per
trial per slot = (wall time of Tuner.fit x slots - sum of the trials' own time) / N. Ours is
the real search Tuner (Optuna, ASHA, a checkpoint per epoch, data through the object store);
the bare run is a function that sleeps as long as our trials took, reporting once per epoch.

    python bench/search_overhead.py [--trials 8] [--dataset folder --data DIR]

Last line: `search_overhead: OURS s/trial (bare Ray Tune BARE s/trial, ratio R)`.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray
import torch
from ray import tune

from tuning.data import ImageData, Split, load_data, make_trial_data
from tuning.search import make_tuner, parse_args
from tuning.spaces import load_space

SLOTS = 2


def sleep_trial(config: dict) -> None:
    for epoch in range(1, config["epochs"] + 1):
        time.sleep(config["seconds_per_epoch"])
        tune.report({"epoch": epoch, "val_acc": 0.5})


def overhead_per_trial(results: tune.ResultGrid, wall: float) -> tuple[float, float]:
    inside = sum(r.metrics["time_total_s"] for r in results)
    return (wall * SLOTS - inside) / len(results), inside / len(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dataset", default="folder")
    parser.add_argument("--data", default=None, help="real images; default: random 32x32 images")
    bench = parser.parse_args()

    if bench.data:
        images = load_data(bench.dataset, bench.data)
    else:
        generator = torch.Generator().manual_seed(0)
        def random_split(n):
            return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator), torch.arange(n) % 10)
        images = ImageData(random_split(10_000), random_split(1_000), tuple(str(i) for i in range(10)))
    data = make_trial_data(images, val_size=256, train_limit=512)
    ray.init(num_cpus=SLOTS, num_gpus=0, include_dashboard=False)

    with tempfile.TemporaryDirectory() as storage:
        # grace period = max epochs: ASHA stops nothing, so both runs do the same number of epochs
        args = parse_args(["--space", "smoke", "--num-samples", str(bench.trials), "--max-epochs", str(bench.epochs),
                           "--grace-period", str(bench.epochs), "--num-gpus", "0", "--name", "ours"])  # fmt: skip
        start = time.perf_counter()
        ours_results = make_tuner(args, load_space("smoke"), data, storage).fit()
        ours, inside = overhead_per_trial(ours_results, time.perf_counter() - start)

        bare_tuner = tune.Tuner(
            tune.with_resources(sleep_trial, {"cpu": 1}),
            param_space={"epochs": bench.epochs, "seconds_per_epoch": inside / bench.epochs},
            tune_config=tune.TuneConfig(num_samples=bench.trials, max_concurrent_trials=SLOTS),
            run_config=tune.RunConfig(name="bare", storage_path=storage, verbose=0),
        )
        start = time.perf_counter()
        bare_results = bare_tuner.fit()
        bare, _ = overhead_per_trial(bare_results, time.perf_counter() - start)

    print(f"{bench.trials} trials x {bench.epochs} epochs, {SLOTS} slots; a trial's own time {inside:.2f} s")
    print(f"overhead per trial per slot: ours {ours:.2f} s, bare Ray Tune {bare:.2f} s")
    print(f"search_overhead: {ours:.2f} s/trial (bare Ray Tune {bare:.2f} s/trial, ratio {ours / bare:.2f})")


if __name__ == "__main__":
    main()
