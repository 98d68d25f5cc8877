"""`python -m tuning.search`: search the all-conv net's hyperparameters with Ray Tune.

Optuna (TPE, seeded) proposes configs from a search-space file, ASHA stops weak trials early
on validation accuracy, and each trial trains on the GPU share it was given (or the CPU).

    python -m tuning.search --num-gpus 4                       # the default space on CIFAR-10
    python -m tuning.search --smoke-test --dataset folder --data DIR
    python -m tuning.search --resume --name NAME               # continue an interrupted search
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from tuning.cluster import (
    ClusterError,
    check_fits_a_trial,
    check_storage_shared,
    default_gpus_per_trial,
    read_text,
    resolve_storage,
    searches_by_age,
    start_ray,
    trial_slots,
    write_json,
)
from tuning.config import METRIC, MODE, TrialConfig
from tuning.data import DataError, TrialData, add_data_arguments, to_model_input, trial_data_from_args
from tuning.plots import search_plots
from tuning.spaces import SearchSpace, SpaceError, load_space, shipped_spaces
from tuning.tracking import (
    DEFAULT_EXPERIMENT,
    DEFAULT_REGISTERED_MODEL,
    DEFAULT_TRACKING_URI,
    LOST_WRITES_FILE,
    TRACKING_ERRORS,
    SearchTracker,
    TrackingError,
    check_reachable,
    register_champion,
    short,
    tracking_uri,
)
from tuning.trainable import run_trial
from tuning.training import load_checkpoint, pick_device, test_accuracy

# Tune snapshots its state whenever a trial checkpoints past num_to_keep. We want that (a resume
# loses nothing) and each snapshot takes milliseconds, so its "excessive snapshots" warning is noise.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # the driver's handler (stop_on_signals) asks Tune to stop

ARGS_FILE = "search_args.json"  # the driver's own arguments, so --resume reloads the same data
SUMMARY_FILE = "summary.json"
# --smoke-test: a whole search, end to end, in about a minute on a laptop CPU.
SMOKE_DEFAULTS = {"space": "smoke", "num_samples": 4, "max_epochs": 2, "train_limit": 2048, "val_size": 1000}


class SearchError(RuntimeError):
    """A search that cannot start; the message says what to change."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tuning.search", description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    search = parser.add_argument_group("search")
    search.add_argument("--space", default="allconv", help=f"a shipped space ({', '.join(shipped_spaces())}) or a YAML path (default: allconv)")
    search.add_argument("--num-samples", type=int, default=20, help="trials to run in total (default: 20)")
    search.add_argument("--max-epochs", type=int, default=20, help="epochs for a trial that ASHA never stops; every trial's lr schedule spans them (default: 20)")
    search.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial (default: 1)")
    search.add_argument("--reduction-factor", type=int, default=3, help="ASHA keeps the top 1/N at each rung (default: 3)")
    search.add_argument("--seed", type=int, default=0, help="seeds the sampler: the same seed proposes the same configs (default: 0)")
    search.add_argument("--compile", action="store_true", help="torch.compile every trial's net (worth it for long trials)")
    search.add_argument("--max-failures", type=int, default=0, help="retries of a failed trial, from its last checkpoint (default: 0)")
    resources = parser.add_argument_group("resources")
    resources.add_argument("--num-gpus", type=float, default=None, help="GPUs for a local Ray (default: all visible; 0: train on CPU)")
    resources.add_argument("--gpus-per-trial", type=float, default=None, help="GPU share of one trial; 0.25 packs 4 trials on a GPU (default: 1 with GPUs, else 0)")
    resources.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs of one trial (default: 1)")
    resources.add_argument("--max-concurrent", type=int, default=0, help="trials at once at most; 0: as many as the cluster's CPUs and GPUs fit (default: 0)")
    resources.add_argument("--address", default=None, help="join a running Ray cluster ('auto' on a cluster node) instead of starting one")
    add_data_arguments(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--storage-path", default="ray_results", help="where results and checkpoints go: a dir (shared on multi-node clusters) or s3://... (default: ./ray_results)")
    output.add_argument("--name", default=None, help="this search's name (default: SPACE-YYYYmmdd-HHMMSS)")
    output.add_argument("--resume", action="store_true", help="continue the search --name (default: the latest) in --storage-path")
    output.add_argument("--tracking-uri", default=None, help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})")
    output.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment that holds this search's runs (default: {DEFAULT_EXPERIMENT})")
    output.add_argument("--registered-model", default=DEFAULT_REGISTERED_MODEL, help=f"registry name of the best model (default: {DEFAULT_REGISTERED_MODEL})")
    parser.add_argument("--smoke-test", action="store_true", help="a tiny end-to-end search: " + ", ".join(f"{k}={v}" for k, v in SMOKE_DEFAULTS.items()))
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke_test:  # smoke defaults, under anything given explicitly
        parser.set_defaults(**SMOKE_DEFAULTS)
        args = parser.parse_args(argv)
    if args.address is None:  # a local Ray: this machine's GPUs (a cluster's are counted once joined)
        if args.num_gpus is None:
            args.num_gpus = torch.cuda.device_count()
        if args.gpus_per_trial is None:
            args.gpus_per_trial = 1.0 if args.num_gpus > 0 else 0.0
    for problem in flag_problems(args):
        parser.error(problem)
    return args


def flag_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.num_samples < 1:
        problems.append(f"--num-samples must be at least 1, not {args.num_samples}")
    if args.max_epochs < 1:
        problems.append(f"--max-epochs must be at least 1, not {args.max_epochs}")
    if not 1 <= args.grace_period <= args.max_epochs:
        problems.append(f"--grace-period must be from 1 to --max-epochs ({args.max_epochs}), not {args.grace_period}")
    if args.reduction_factor < 2:
        problems.append(f"--reduction-factor must be at least 2, not {args.reduction_factor}")
    if args.max_failures < 0 or args.max_concurrent < 0:
        problems.append("--max-failures and --max-concurrent cannot be negative")
    if args.cpus_per_trial <= 0:
        problems.append(f"--cpus-per-trial must be above 0, not {args.cpus_per_trial}")
    if (args.num_gpus or 0) < 0:
        problems.append(f"--num-gpus cannot be negative, not {args.num_gpus}")
    gpus_per_trial = args.gpus_per_trial or 0
    if gpus_per_trial < 0 or (args.address is None and args.num_gpus > 0 and gpus_per_trial == 0):
        problems.append(f"--gpus-per-trial must be above 0 when there are GPUs, not {args.gpus_per_trial}")
    if gpus_per_trial > 1 and gpus_per_trial != int(gpus_per_trial):
        problems.append(f"--gpus-per-trial above 1 must be a whole number, not {args.gpus_per_trial}")
    if args.address is None and args.gpus_per_trial > args.num_gpus:
        problems.append(f"--gpus-per-trial {args.gpus_per_trial:g} is more than the {args.num_gpus:g} GPUs available (--num-gpus)")
    return problems


# ---------------------------------------------------------------- the Tuner


def make_trainable(args: argparse.Namespace, data: TrialData):
    # with_parameters puts the data in the object store once; every trial reads that copy.
    return tune.with_resources(
        tune.with_parameters(run_trial, data=data), {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
    )


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # the config is in params.json; names stay short


def make_tracker(args: argparse.Namespace, experiment: str) -> SearchTracker:
    return SearchTracker(args.tracking_uri, args.experiment, args.name, args.max_epochs, experiment)


class DivergenceAwareOptunaSearch(OptunaSearch):
    """A diverged trial ends with val_acc NaN. Optuna refuses to be told NaN (Ray logs that and
    the trial stays RUNNING in the study), so it is told the trial FAILED instead: TPE then
    learns nothing good about that config and never counts NaN as a score."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if math.isfinite(result.get(METRIC, math.nan)):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is not None and not math.isfinite(result.get(METRIC, math.nan)):
            result, error = None, True
        super().on_trial_complete(trial_id, result, error)


def make_tuner(args: argparse.Namespace, space: SearchSpace, data: TrialData, storage: str) -> tune.Tuner:
    constants = {"epochs": args.max_epochs, "num_classes": len(data.classes), **({"compile": True} if args.compile else {})}
    searcher = DivergenceAwareOptunaSearch(
        space=space.define_by_run(constants),
        metric=METRIC,
        mode=MODE,
        sampler=space.optuna_sampler(args.seed),
        points_to_evaluate=space.first_points() or None,
    )
    scheduler = ASHAScheduler(
        time_attr="epoch", max_t=args.max_epochs, grace_period=args.grace_period, reduction_factor=args.reduction_factor
    )
    return tune.Tuner(
        make_trainable(args, data),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=args.num_samples,
            max_concurrent_trials=trial_slots(args.cpus_per_trial, args.gpus_per_trial, args.num_gpus if args.address else None, args.max_concurrent),
            trial_dirname_creator=trial_dirname,
            # A new trial runs in the previous one's worker: torch and CUDA start once per slot.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=args.name,
            storage_path=storage,
            # Per trial: its two best epochs (the best for the final model) and its latest (to resume
            # from); one of those is the fallback when the latest turns out corrupt.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
            ),
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            callbacks=[make_tracker(args, f"{storage}/{args.name}")],
            verbose=1,
        ),
    )


def restore_args(args: argparse.Namespace) -> argparse.Namespace:
    """A resumed search keeps the arguments it started with, so its data and space match."""
    storage = resolve_storage(args.storage_path)
    name = args.name or next(reversed(searches_by_age(storage, ARGS_FILE)), None)
    saved = name and read_text(f"{storage}/{name}/{ARGS_FILE}")
    if not saved or not tune.Tuner.can_restore(f"{storage}/{name}"):
        what = f"no search named {name!r}" if args.name else "no search"
        raise SearchError(f"--resume: {what} to resume in --storage-path {storage}")
    return argparse.Namespace(**{**json.loads(saved), "resume": True, "name": name})


# ---------------------------------------------------------------- after the search


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    config: dict[str, Any]
    best_val_acc: float | None  # None: never reported, or diverged (then never the best)
    epochs: int
    state: str
    result: tune.Result


def outcomes(results: tune.ResultGrid, max_epochs: int) -> list[TrialOutcome]:
    """Every trial, best first; diverged and silent trials last."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        reported = history is not None and METRIC in history
        epochs = int(history["epoch"].max()) if reported else 0
        diverged = reported and "diverged" in history and history["diverged"].notna().any()
        best = float(history[METRIC].max()) if reported and not diverged else None
        if result.error:
            state = f"failed at epoch {epochs + 1}: {type(result.error).__name__}"
        elif diverged:
            state = f"diverged at epoch {epochs}"
        elif epochs >= max_epochs:
            state = "completed"
        else:
            state = f"stopped by ASHA at epoch {epochs}"
        trial_id = result.metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        rows.append(TrialOutcome(trial_id, result.config, best, epochs, state, result))
    return sorted(rows, key=lambda r: -1 if r.best_val_acc is None else r.best_val_acc, reverse=True)


def best_model(checkpoint: tune.Checkpoint, data: TrialData) -> tuple[torch.nn.Module, dict[str, Any], float]:
    """The best trial's best checkpoint as a model, and its accuracy on the test split (once)."""
    with checkpoint.as_directory() as directory:
        payload = load_checkpoint(directory)
    model, accuracy = test_accuracy(payload, data, pick_device())
    return model, payload, accuracy


def summarize(
    results: tune.ResultGrid, space: SearchSpace, data: TrialData, args: argparse.Namespace, seconds: float
) -> tuple[dict[str, Any], torch.nn.Module | None]:
    rows = outcomes(results, args.max_epochs)
    searched = [dim.key for dim in space.dimensions]
    epochs_run = sum(r.epochs for r in rows)
    budget = len(rows) * args.max_epochs
    summary: dict[str, Any] = {
        "name": args.name,
        "space": space.source,
        "trials": len(rows),
        "stopped_early": sum(r.state.startswith("stopped") for r in rows),
        "failed": sum(r.state.startswith("failed") for r in rows),
        "diverged": sum(r.state.startswith("diverged") for r in rows),
        "epochs_run": epochs_run,
        "epochs_budget": budget,
        "budget_fraction": epochs_run / budget if budget else 0.0,
        "wall_seconds": seconds,
        "leaderboard": [
            {"trial_id": r.trial_id, METRIC: r.best_val_acc, "epochs": r.epochs, "state": r.state,
             **{k: r.config.get(k) for k in searched}}
            for r in rows
        ],  # fmt: skip
    }
    model = None
    if rows and rows[0].best_val_acc is not None:
        checkpoint = rows[0].result.get_best_checkpoint(METRIC, MODE)
        model, payload, test_acc = best_model(checkpoint, data)
        summary["best"] = {
            "trial_id": rows[0].trial_id,
            "config": payload["config"],
            METRIC: payload["metrics"][METRIC],
            "epoch": payload["epoch"],
            "test_acc": test_acc,
            "checkpoint": checkpoint.path,
        }
    return summary, model


def print_summary(summary: dict[str, Any], top: int = 10) -> None:
    board = summary["leaderboard"]
    print(f"\n{'rank':>4}  {METRIC:>8}  {'epochs':>6}  state / config")
    for rank, row in enumerate(board[:top], 1):
        acc = "-" if row[METRIC] is None else f"{row[METRIC]:.2%}"
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k not in (METRIC, "epochs", "state", "trial_id"))
        print(f"{rank:>4}  {acc:>8}  {row['epochs']:>6}  {row['state']} | {params}")
    print(
        f"\nASHA stopped {summary['stopped_early']} of {summary['trials']} trials before the last epoch; "
        f"epochs run {summary['epochs_run']} of {summary['epochs_budget']} ({summary['budget_fraction']:.0%} of the full budget); "
        f"{summary['failed']} failed, {summary['diverged']} diverged; {summary['wall_seconds']:.0f} s"
    )
    if best := summary.get("best"):
        print(f"best: trial {best['trial_id']} epoch {best['epoch']}  {METRIC} {best[METRIC]:.2%}  test_acc {best['test_acc']:.2%}")
    tracking = summary.get("tracking", {})
    if tracking.get("lost_writes"):
        print(f"MLflow: {tracking['lost_writes']} writes lost while {tracking['uri']} was unreachable")
    if registered := summary.get("model"):
        verdict = "now the champion" if registered["champion"] else f"not the champion (current: {registered['previous_champion']})"
        print(f"model: {registered['model_uri']}, {verdict}")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    log_to_stderr()
    args = parse_args(argv)
    started = time.time()
    try:
        if args.resume:
            args = restore_args(args)
        args.name = args.name or f"{Path(args.space).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        space = load_space(args.space)
        args.tracking_uri = tracking_uri(args.tracking_uri)
        check_reachable(args.tracking_uri)
        data = trial_data_from_args(args)
        storage = resolve_storage(args.storage_path)
        start_ray(args.address, args.num_gpus)
        if args.gpus_per_trial is None:
            args.gpus_per_trial = default_gpus_per_trial()
        check_fits_a_trial(args.cpus_per_trial, args.gpus_per_trial)
        check_storage_shared(storage)
    except (SpaceError, DataError, SearchError, TrackingError, ClusterError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    experiment = f"{storage}/{args.name}"
    if args.resume:
        print(f"resuming {experiment}")
        # Errored trials go on from their last checkpoint too: a resume finishes what is unfinished.
        tuner = tune.Tuner.restore(experiment, trainable=make_trainable(args, data), resume_errored=True)
    else:
        write_json(f"{experiment}/{ARGS_FILE}", vars(args))
        tuner = make_tuner(args, space, data, storage)
    print(f"search {args.name}: space {space.source}, {args.num_samples} trials x up to {args.max_epochs} epochs, "
          f"{len(data.train)} train / {len(data.val)} val images")  # fmt: skip
    with stop_on_signals() as stop:
        results = tuner.fit()
    tracker = make_tracker(args, experiment)
    resume_hint = f"python -m tuning.search --resume --name {args.name} --storage-path {args.storage_path}"
    if stop.is_set():
        try:
            marked = f"{tracker.close_unfinished('interrupted')} MLflow runs marked KILLED"
            tracker.close("KILLED")
        except TRACKING_ERRORS as err:
            marked = f"MLflow runs not closed ({short(err)})"
        print(f"\ninterrupted: {len(results)} of {args.num_samples} trials started, their checkpoints saved; {marked}.\n"
              f"continue with: {resume_hint}", file=sys.stderr)  # fmt: skip
        return 130

    summary, model = summarize(results, space, data, args, time.time() - started)
    summary["tracking"] = record_search(tracker, summary, model, results, space, data, args)
    write_json(f"{experiment}/{SUMMARY_FILE}", summary)
    print_summary(summary)
    print(f"results: {experiment}")
    return 0


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Ctrl-C and SIGTERM (a scheduler, `kill`, `ray job stop`) stop the search gracefully: Tune,
    asked through SIGUSR1 (its own stop signal; its SIGINT handler is off), saves its state and
    stops the trials where their last checkpoint is. The event says it happened; a second
    signal stops at once. The previous handlers come back afterwards."""
    stop = threading.Event()

    def handle(signum, frame) -> None:
        if stop.is_set() or signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            raise KeyboardInterrupt  # the second time, or before Tune is listening
        stop.set()
        signal.raise_signal(signal.SIGUSR1)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def log_to_stderr() -> None:
    """The driver's own warnings (a tracking outage, say) on stderr, whatever the libraries it
    imports did to the root logger."""
    logger = logging.getLogger("tuning")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def record_search(
    tracker: SearchTracker, summary: dict[str, Any], model: torch.nn.Module | None, results: tune.ResultGrid,
    space: SearchSpace, data: TrialData, args: argparse.Namespace,
) -> dict[str, Any]:
    """The parent run's artifacts and the champion. A tracking store that is down by now costs the
    MLflow record, never the search: everything is in the summary and the checkpoints."""
    lost = read_text(f"{tracker.results_path}/{LOST_WRITES_FILE}")
    record: dict[str, Any] = {"uri": args.tracking_uri, "lost_writes": json.loads(lost)["lost_writes"] if lost else 0}
    try:
        # Runs a killed driver had started for trials Tune never recorded.
        tracker.close_unfinished("never_recorded", keep={row["trial_id"] for row in summary["leaderboard"]})
        tracker.finish(summary, space.text, vars(args), search_plots(results, space, args.max_epochs))
        if model is not None:
            cfg = TrialConfig.from_dict(summary["best"]["config"])
            example = to_model_input(data.test.images[:4], cfg.image_size).contiguous().numpy()
            summary["model"] = register_champion(
                args.tracking_uri, tracker.parent_run_id, model, example, summary["best"]["test_acc"],
                args.registered_model, list(data.classes),
            )  # fmt: skip
        tracker.close()
    except TRACKING_ERRORS as err:
        record["error"] = f"the search's MLflow record is incomplete and no model was registered: {short(err)}"
        print(f"warning: MLflow at {args.tracking_uri}: {record['error']}", file=sys.stderr)
    return record


if __name__ == "__main__":
    sys.exit(main())
