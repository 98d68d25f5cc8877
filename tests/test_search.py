"""The search driver with real Ray (local, 2 CPUs), real Optuna and real training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from tests.helpers import trial_histories
from tuning.config import METRIC
from tuning.search import SUMMARY_FILE, main, parse_args


@pytest.mark.parametrize(
    "flags, culprit",
    [(["--num-samples", "0"], "--num-samples"), (["--max-epochs", "0"], "--max-epochs"),
     (["--max-epochs", "3", "--grace-period", "4"], "--grace-period"), (["--reduction-factor", "1"], "--reduction-factor"),
     (["--num-gpus", "4", "--gpus-per-trial", "8"], "--gpus-per-trial"), (["--num-gpus", "4", "--gpus-per-trial", "0"], "--gpus-per-trial"),
     (["--num-gpus", "0", "--gpus-per-trial", "0.5"], "--gpus-per-trial"), (["--gpus-per-trial", "1.5", "--num-gpus", "4"], "whole number"),
     (["--cpus-per-trial", "0"], "--cpus-per-trial"), (["--num-samples", "x"], "--num-samples")],
)  # fmt: skip
def test_nonsense_flags_are_named(flags, culprit, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(flags)
    assert exit_.value.code == 2 and culprit in capsys.readouterr().err


def test_smoke_test_defaults_yield_to_explicit_flags():
    args = parse_args(["--smoke-test", "--num-samples", "3"])
    assert (args.space, args.num_samples, args.max_epochs, args.train_limit) == ("smoke", 3, 2, 2048)


def test_bad_space_and_missing_data_fail_before_ray_starts(tmp_path, image_folder, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  lr: {uniform: [1, 0.1]}\n")
    assert main(["--space", str(bad), "--dataset", "folder", "--data", str(image_folder), "--num-gpus", "0"]) == 2
    assert "bad.yaml" in capsys.readouterr().err
    assert main(["--dataset", "folder", "--data", str(tmp_path / "none"), "--num-gpus", "0"]) == 2
    assert str(tmp_path / "none") in capsys.readouterr().err
    assert not ray.is_initialized()


def test_resume_with_nothing_to_resume_is_named(tmp_path, capsys):
    assert main(["--resume", "--storage-path", str(tmp_path), "--num-gpus", "0"]) == 2
    assert "--resume" in capsys.readouterr().err and not ray.is_initialized()


@pytest.fixture
def local_ray(request):
    ray.init(num_cpus=2, num_gpus=getattr(request, "param", 0), include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_asha_search_on_real_images(smoke_search):
    summary, experiment = smoke_search.summary, smoke_search.experiment
    board = summary["leaderboard"]
    assert summary["trials"] == len(board) == 8 and summary["failed"] == 0
    assert summary["epochs_run"] == sum(row["epochs"] for row in board) <= 24
    stopped = [row for row in board if row["state"].startswith("stopped by ASHA")]
    assert len(stopped) == summary["stopped_early"] >= 1
    assert all(row["epochs"] < 3 and f"epoch {row['epochs']}" in row["state"] for row in stopped)
    assert board == sorted(board, key=lambda row: row[METRIC], reverse=True)
    best = summary["best"]
    assert best[METRIC] == board[0][METRIC] and 0.1 < best["test_acc"] <= 1
    assert Path(best["checkpoint"], "checkpoint.pt").is_file()

    histories = trial_histories(experiment)
    assert len(histories) == 8
    for history in histories:
        assert [row["epoch"] for row in history] == list(range(1, len(history) + 1))
        assert {"val_acc", "val_loss", "train_loss", "lr", "images_per_s"} <= set(history[-1])
    for trial in experiment.glob("trial_*"):
        assert len(list(trial.glob("checkpoint_*"))) <= 3  # its two best and its latest, not every epoch


@pytest.mark.slow
@pytest.mark.parametrize("local_ray", [4], indirect=True)
def test_half_a_gpu_per_trial_runs_8_trials_at_once(local_ray, cifar_jpeg_dir, tmp_path):
    argv = ["--space", "smoke", "--num-samples", "8", "--max-epochs", "2", "--grace-period", "2",
            "--num-gpus", "4", "--gpus-per-trial", "0.5", "--cpus-per-trial", "0.25",
            "--dataset", "folder", "--data", str(cifar_jpeg_dir), "--train-limit", "1024", "--val-size", "500",
            "--storage-path", str(tmp_path), "--name", "packed"]  # fmt: skip
    assert main(argv) == 0
    spans = []
    for history in trial_histories(tmp_path / "packed"):
        end = history[-1]["timestamp"]
        spans.append((end - history[-1]["time_total_s"], end))
        assert history[-1]["device"] == "cpu"  # Ray granted a GPU share, but no CUDA device exists here
    assert len(spans) == 8
    latest_start, earliest_end = max(s for s, _ in spans), min(e for _, e in spans)
    assert latest_start < earliest_end, f"not all 8 trials overlapped: {spans}"


@pytest.mark.slow
@pytest.mark.parametrize("local_ray", [1], indirect=True)
def test_a_trial_bigger_than_any_node_is_an_error_not_a_hang(local_ray, image_folder, tmp_path, capsys):
    argv = ["--num-gpus", "2", "--gpus-per-trial", "2", "--dataset", "folder", "--data", str(image_folder),
            "--val-size", "6", "--storage-path", str(tmp_path)]  # fmt: skip
    assert main(argv) == 2
    assert "--gpus-per-trial 2 does not fit" in capsys.readouterr().err


def run_until_killed(argv: list[str], experiment: Path, results_wanted: int, timeout: float = 300) -> None:
    """Starts the driver in its own process group, and SIGKILLs the group (Ray included) once
    `results_wanted` epoch results are on disk."""
    process = subprocess.Popen([sys.executable, "-m", "tuning.search", *argv], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and process.poll() is None:
            if sum(len(h) for h in trial_histories(experiment, allow_empty=True)) >= results_wanted:
                break
            time.sleep(0.5)
        assert process.poll() is None, "the search ended before it could be interrupted"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
def test_resume_after_the_driver_is_killed_runs_each_trial_once(cifar_jpeg_dir, tmp_path):
    argv = ["--space", "smoke", "--num-samples", "4", "--max-epochs", "2", "--num-gpus", "0",
            "--dataset", "folder", "--data", str(cifar_jpeg_dir), "--train-limit", "1024", "--val-size", "500",
            "--storage-path", str(tmp_path), "--name", "killed", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip
    experiment = tmp_path / "killed"
    run_until_killed(argv, experiment, results_wanted=3)
    reported = {trial.name.removeprefix("trial_") for trial in experiment.glob("trial_*")
                if trial_histories(experiment, allow_empty=True, only=trial.name)[0]}  # fmt: skip
    assert reported and not (experiment / SUMMARY_FILE).exists()

    resumed = subprocess.run([sys.executable, "-m", "tuning.search", "--resume", "--storage-path", str(tmp_path)],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((experiment / SUMMARY_FILE).read_text())
    assert summary["trials"] == 4 and summary["failed"] == 0
    # Every trial that had reported goes on under its own id; the total stays --num-samples. (A trial
    # created in the moment before the kill, before Tune recorded it, can leave an empty folder.)
    assert reported <= {row["trial_id"] for row in summary["leaderboard"]}
    for history in trial_histories(experiment, allow_empty=True):
        epochs = [row["epoch"] for row in history]
        assert epochs == list(range(1, len(epochs) + 1)), f"epochs repeated or missing: {epochs}"
    configs = [json.dumps(row["config"], sort_keys=True) for history in trial_histories(experiment, allow_empty=True) for row in history[:1]]
    assert len(configs) == len(set(configs)) == 4  # no config trained twice

    # One MLflow child run per trial, none left RUNNING (a run for a trial Tune never recorded
    # is closed as KILLED), and the champion is the best val_acc any trial actually reported.
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("allconv").experiment_id], "tags.role = 'trial'")
    finished = [run.data.tags["trial_id"] for run in runs if run.info.status == "FINISHED"]
    assert sorted(finished) == sorted(row["trial_id"] for row in summary["leaderboard"])
    assert all(run.info.status == "KILLED" for run in runs if run.data.tags["trial_id"] not in finished)
    reported = max(row[METRIC] for history in trial_histories(experiment, allow_empty=True) for row in history)
    assert summary["best"][METRIC] == reported
