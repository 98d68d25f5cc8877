"""How much of the full epoch budget ASHA spends, and whether it keeps the config that a
full-budget run ranks best.

Runs the same search twice on real data, in one Ray session: once with ASHA (the defaults:
grace period 1, reduction factor 3), once with ASHA unable to stop anything (grace period =
max epochs), so every config trains to the end. With fewer trials than TPE's random start-up
(10), both runs propose exactly the same configs from the same seed; the script checks that.

    python bench/asha_budget.py --dataset folder --data DIR

Last line: `asha_budget: E epochs (full budget F epochs, ratio R); full-budget best kept: yes|no`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ray

from tuning.data import add_data_arguments
from tuning.search import SUMMARY_FILE, main as search


def run_search(common: list[str], folder: Path, name: str, grace_period: int) -> dict:
    argv = [*common, "--grace-period", str(grace_period), "--storage-path", str(folder), "--name", name,
            "--tracking-uri", f"sqlite:///{folder}/mlflow.db", "--experiment", "asha-budget",
            "--registered-model", "asha-budget"]  # fmt: skip
    if search(argv) != 0:
        raise SystemExit(f"the {name} search failed")
    return json.loads((folder / name / SUMMARY_FILE).read_text())


def config_key(row: dict, searched: list[str]) -> str:
    return json.dumps({k: row[k] for k in searched}, sort_keys=True)


def percent(value: float | None) -> str:
    return "diverged" if value is None else f"{value:.2%}"  # a diverged trial has no score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="smoke")
    parser.add_argument("--num-samples", type=int, default=8, help="at most 10, so both runs see the same configs")
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    add_data_arguments(parser)
    parser.set_defaults(train_limit=4096, val_size=2000)
    args = parser.parse_args()

    common = ["--space", args.space, "--num-samples", str(args.num_samples), "--max-epochs", str(args.max_epochs),
              "--seed", str(args.seed),
              "--dataset", args.dataset, "--train-limit", str(args.train_limit), "--val-size", str(args.val_size)]  # fmt: skip
    if args.data:
        common += ["--data", args.data]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        asha = run_search(common, folder, "asha", grace_period=1)
        full = run_search(common, folder, "full", grace_period=args.max_epochs)
    ray.shutdown()

    searched = [k for k in asha["leaderboard"][0] if k not in ("trial_id", "val_acc", "epochs", "state")]
    asha_rank = [config_key(row, searched) for row in asha["leaderboard"]]
    full_rank = [config_key(row, searched) for row in full["leaderboard"]]
    if sorted(asha_rank) != sorted(full_rank):
        raise SystemExit("the two runs proposed different configs; use --num-samples 10 or fewer")
    print(f"\n{'config':70s} {'ASHA epochs':>11s} {'ASHA val':>9s} {'full val':>9s} {'full rank':>9s}")
    full_rows = {config_key(row, searched): (rank, row) for rank, row in enumerate(full["leaderboard"], 1)}
    for row in asha["leaderboard"]:
        rank, full_row = full_rows[config_key(row, searched)]
        print(f"{config_key(row, searched)[:70]:70s} {row['epochs']:>11d} {percent(row['val_acc']):>9s} {percent(full_row['val_acc']):>9s} {rank:>9d}")
    kept = asha_rank[0] == full_rank[0]
    best_full_rank_in_asha = asha_rank.index(full_rank[0]) + 1
    print(f"ASHA's best is the full run's #{full_rows[asha_rank[0]][0]}; the full run's best is ASHA's #{best_full_rank_in_asha} "
          f"(ASHA trained it {asha['leaderboard'][best_full_rank_in_asha - 1]['epochs']} of {args.max_epochs} epochs)")
    print(f"asha_budget: {asha['epochs_run']} epochs (full budget {full['epochs_run']} epochs, ratio "
          f"{asha['epochs_run'] / full['epochs_run']:.2f}); full-budget best kept: {'yes' if kept else 'no'}")


if __name__ == "__main__":
    main()
