"""MLflow logging time per epoch per trial, SQLite store: our batched write against one
request per metric value, in the same run and the same store.

    python bench/tracking_overhead.py [--trials 8] [--epochs 20]

Last line: `tracking_overhead: OURS ms/epoch/trial (one request per value REF ms, ratio R)`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field

from mlflow import MlflowClient

from tuning.tracking import EPOCH_METRICS, SearchTracker


@dataclass
class TrialRecord:  # what the callback reads from Tune's Trial
    trial_id: str
    config: dict = field(default_factory=lambda: {"lr": 0.1, "width_mult": 1.0, "batch_size": 256})
    last_result: dict = field(default_factory=dict)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        tracker = SearchTracker(uri, "bench", "bench", args.epochs, folder)
        trials = [TrialRecord(f"t{i:03d}") for i in range(args.trials)]
        for trial in trials:
            tracker.on_trial_start(0, trials, trial)
        results = [{"epoch": e, "device": "cpu", **{k: 0.5 + e / 100 for k in EPOCH_METRICS}} for e in range(1, args.epochs + 1)]

        start = time.perf_counter()
        for result in results:
            for trial in trials:
                tracker.on_trial_result(0, trials, trial, result)
        ours = (time.perf_counter() - start) / (args.epochs * args.trials)

        client = MlflowClient(uri)
        naive_runs = [client.create_run(tracker.experiment_id).info.run_id for _ in trials]
        start = time.perf_counter()
        for result in results:
            for run in naive_runs:
                for key in EPOCH_METRICS:
                    client.log_metric(run, key, result[key], step=result["epoch"])
        naive = (time.perf_counter() - start) / (args.epochs * args.trials)
    print(f"{args.trials} trials x {args.epochs} epochs x {len(EPOCH_METRICS)} metrics, SQLite")
    print(f"tracking_overhead: {ours * 1000:.1f} ms/epoch/trial (one request per value {naive * 1000:.1f} ms, ratio {ours / naive:.2f})")


if __name__ == "__main__":
    main()
