"""Faults in real searches (real Ray, Optuna, MLflow and training on CIFAR-10), injected through
tuning.faults: trials that raise, run out of disk, diverge or leave a corrupt checkpoint; a driver
stopped by SIGTERM; a tracking server that goes away mid-search. Each must end with nothing
finished lost, a clear record of what happened, and the right champion."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import TrackingServer, search_command, trial_histories
from tuning.config import METRIC
from tuning.faults import FAULTS_ENV
from tuning.search import SUMMARY_FILE, DivergenceAwareOptunaSearch
from tuning.tracking import CHAMPION
from tuning.training import load_checkpoint


def search(data: Path, storage: Path, name: str, uri: str, *extra: str) -> list[str]:
    return search_command(data, storage, name, uri, "--num-gpus", "0", *extra)


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def claimed(faults_file: Path) -> dict[str, str]:
    """fault kind (+ how often) -> the trial that claimed it"""
    return {f"{f['kind']}x{f['fired']}": f["trial"] for f in json.loads(faults_file.read_text()) if f.get("trial")}


def trial_runs(uri: str, experiment: str) -> dict[str, object]:
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], "tags.role = 'trial'")
    ids = [run.data.tags["trial_id"] for run in runs]
    assert len(ids) == len(set(ids)), f"duplicate child runs: {sorted(ids)}"
    return {run.data.tags["trial_id"]: run for run in runs}


@pytest.mark.slow
def test_trials_that_fail_diverge_or_corrupt_their_checkpoint(cifar_jpeg_dir, tmp_path):
    storage, uri, name = tmp_path / "ray", f"sqlite:///{tmp_path}/mlflow.db", "faults"
    experiment = storage / name
    faults = [
        {"kind": "raise", "at_epoch": 2, "times": 1},  # retried once: goes on from its checkpoint
        {"kind": "raise", "at_epoch": 2, "times": 2},  # fails again: retries (1) exhausted
        {"kind": "enospc", "at_epoch": 2, "times": 2},  # disk full while checkpointing, twice
        {"kind": "nan", "at_epoch": 1, "times": 1},  # its weights turn NaN after epoch 1
        {"kind": "corrupt", "at_epoch": 2, "times": 1, "experiment": str(experiment)},
    ]
    for fault in faults:
        fault["fired"] = fault["times"]
    faults_file = tmp_path / "faults.json"
    faults_file.write_text(json.dumps(faults))
    argv = search(cifar_jpeg_dir, storage, name, uri, "--num-samples", "6", "--max-epochs", "3", "--grace-period", "3",
                  "--max-failures", "1")  # fmt: skip
    first = run(argv, env={FAULTS_ENV: str(faults_file)})
    assert first.returncode == 0, first.stderr[-3000:]
    trial = claimed(faults_file)
    assert len(trial) == 5 and all(f["times"] == 0 for f in json.loads(faults_file.read_text())), trial

    summary = json.loads((experiment / SUMMARY_FILE).read_text())
    board = {row["trial_id"]: row for row in summary["leaderboard"]}
    assert summary["trials"] == 6 and summary["failed"] == 2 and summary["diverged"] == 1
    history = {t: [row for row in h] for t, h in zip([p.name[6:] for p in sorted(experiment.glob("trial_*"))], trial_histories(experiment))}
    epochs = {t: [row["epoch"] for row in h] for t, h in history.items()}

    # 1. Raised once at epoch 2, retried from the epoch-1 checkpoint: nothing repeated or missing.
    assert epochs[trial["raisex1"]] == [1, 2, 3] and board[trial["raisex1"]]["state"] == "completed"
    # ... raised again after its retry: failed, with the error in its MLflow run; the others unaffected.
    assert board[trial["raisex2"]]["state"].startswith("failed at epoch 2")
    runs = trial_runs(uri, name)
    assert runs[trial["raisex2"]].info.status == "FAILED" and "InjectedFault" in runs[trial["raisex2"]].data.tags["error"]
    clean = set(board) - set(trial.values())
    assert len(clean) == 1 and all(epochs[t] == [1, 2, 3] for t in clean)

    # 2. Diverged: stopped itself in epoch 2, never the best, told to Optuna as failed, not scored.
    diverged = trial["nanx1"]
    assert board[diverged]["state"] == "diverged at epoch 2" and board[diverged][METRIC] is None
    assert math.isnan(history[diverged][-1][METRIC]) and history[diverged][-1]["diverged"]
    assert summary["best"]["trial_id"] != diverged
    assert runs[diverged].info.status == "FAILED" and runs[diverged].data.tags["end_state"] == "diverged"
    searcher = DivergenceAwareOptunaSearch()
    searcher.restore_from_dir(str(experiment))
    study = {t.number: t.state.name for t in searcher._ot_study.get_trials(deepcopy=False)}
    states = {tid: study[t.number] for tid, t in searcher._ot_trials.items()}
    assert states[diverged] in ("FAIL", "PRUNED") and states[trial["raisex1"]] == "COMPLETE"

    # 5. A truncated latest checkpoint: detected, the one before it used, a warning said so.
    corrupt = epochs[trial["corruptx1"]]
    assert corrupt == [1, 2, 2, 3], corrupt  # epoch 2 again, from epoch 1's checkpoint
    twice = [row for row in history[trial["corruptx1"]] if row["epoch"] == 2]
    assert twice[0][METRIC] == twice[1][METRIC] and twice[0]["train_loss"] == twice[1]["train_loss"]
    assert "truncated or corrupt" in first.stdout + first.stderr and "falling back" in first.stdout + first.stderr

    # 6. Disk full at the epoch-2 checkpoint: a clear error, and epoch 1's checkpoint intact.
    full = trial["enospcx2"]
    assert board[full]["state"].startswith("failed at epoch 2") and "No space left" in runs[full].data.tags["error"]
    (kept,) = sorted((experiment / f"trial_{full}").glob("checkpoint_*"))
    assert load_checkpoint(kept)["epoch"] == 1

    # ... and the search stays resumable: the failed trials finish from their checkpoints.
    second = run([sys.executable, "-m", "tuning.search", "--resume", "--name", name, "--storage-path", str(storage)])
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((experiment / SUMMARY_FILE).read_text())
    assert summary["trials"] == 6 and summary["failed"] == 0 and summary["diverged"] == 1
    for failed in (trial["raisex2"], full):
        assert [row["epoch"] for row in trial_histories(experiment, only=f"trial_{failed}")[0]] == [1, 2, 3]
    runs = trial_runs(uri, name)
    assert len(runs) == 6 and runs[full].info.status == runs[trial["raisex2"]].info.status == "FINISHED"
    version = MlflowClient(uri).get_model_version_by_alias(f"allconv-{name}", CHAMPION)
    assert version.tags["search_run_id"] and summary["best"]["trial_id"] != diverged


def results_so_far(experiment: Path) -> int:
    return sum(len(h) for h in trial_histories(experiment, allow_empty=True))


def wait_for_results(experiment: Path, count: int, driver: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while results_so_far(experiment) < count:
        assert driver.poll() is None, "the search ended too soon"
        assert time.time() < deadline, f"fewer than {count} results after {timeout} s"
        time.sleep(0.3)


@pytest.mark.slow
def test_sigterm_stops_the_search_cleanly_and_it_resumes(cifar_jpeg_dir, tmp_path):
    storage, uri, name = tmp_path / "ray", f"sqlite:///{tmp_path}/mlflow.db", "stopped"
    experiment = storage / name
    argv = search(cifar_jpeg_dir, storage, name, uri, "--num-samples", "4", "--max-epochs", "3", "--grace-period", "3")
    driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_results(experiment, 2, driver)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, err[-3000:]
    assert f"--resume --name {name} --storage-path {storage}" in err and "marked KILLED" in err

    runs = trial_runs(uri, name)
    statuses = {run.info.status for run in runs.values()}
    assert "KILLED" in statuses and "RUNNING" not in statuses  # stopped trials: KILLED, not FINISHED or RUNNING
    assert all(run.data.tags["end_state"] == "interrupted" for run in runs.values() if run.info.status == "KILLED")
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name(name).experiment_id], "tags.role = 'search'")
    assert parent.info.status == "KILLED"
    for trial, history in zip(sorted(experiment.glob("trial_*")), trial_histories(experiment, allow_empty=True)):
        if history:  # the last epoch Tune recorded before the stop has its checkpoint on disk
            assert history[-1]["epoch"] in {load_checkpoint(c)["epoch"] for c in trial.glob("checkpoint_*")}

    resumed = run([sys.executable, "-m", "tuning.search", "--resume", "--name", name, "--storage-path", str(storage)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((experiment / SUMMARY_FILE).read_text())
    assert summary["trials"] == 4 and summary["failed"] == 0
    runs = trial_runs(uri, name)
    assert len(runs) == 4 and {run.info.status for run in runs.values()} == {"FINISHED"}
    for history in trial_histories(experiment):
        epochs = [row["epoch"] for row in history]
        # A result that lands while the driver stops is written after Tune's last snapshot of the
        # experiment, so the resumed trial can replay that one epoch from the checkpoint before
        # it: to the same numbers, as epochs are seeded.
        assert sorted(set(epochs)) == [1, 2, 3] and len(epochs) <= 4, epochs
        for epoch in {e for e in epochs if epochs.count(e) == 2}:
            first, again = (row for row in history if row["epoch"] == epoch)
            assert (first[METRIC], first["train_loss"]) == (again[METRIC], again["train_loss"]), epochs


@pytest.fixture
def tracking_server(tmp_path):
    (tmp_path / "mlflow").mkdir()
    server = TrackingServer(f"sqlite:///{tmp_path}/mlflow/server.db", tmp_path / "mlflow" / "artifacts")
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
def test_a_tracking_server_that_goes_away_mid_search(tracking_server, cifar_jpeg_dir, tmp_path):
    storage = tmp_path / "ray"
    # Down for a while, then back: training goes on, and every epoch reaches MLflow in the end.
    argv = search(cifar_jpeg_dir, storage, "outage", tracking_server.uri, "--num-samples", "4", "--max-epochs", "3",
                  "--grace-period", "3")  # fmt: skip
    driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_results(storage / "outage", 2, driver)
    tracking_server.stop()
    down_at = results_so_far(storage / "outage")
    wait_for_results(storage / "outage", down_at + 3, driver)  # training went on without it
    tracking_server.start()
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output[-3000:]
    assert "unreachable" in output and "is back" in output
    summary = json.loads((storage / "outage" / SUMMARY_FILE).read_text())
    assert summary["tracking"]["lost_writes"] == 0 and "error" not in summary["tracking"]
    client = MlflowClient(tracking_server.uri)
    runs = trial_runs(tracking_server.uri, "outage")
    for trial, history in zip(sorted((storage / "outage").glob("trial_*")), trial_histories(storage / "outage")):
        logged = [m.step for m in client.get_metric_history(runs[trial.name[6:]].info.run_id, METRIC)]
        assert sorted(logged) == [row["epoch"] for row in history]
    assert client.get_model_version_by_alias("allconv-outage", CHAMPION)

    # Down and never back: the search still ends, in bounded time, and says what was lost.
    argv = search(cifar_jpeg_dir, storage, "gone", tracking_server.uri, "--num-samples", "2", "--max-epochs", "2",
                  "--grace-period", "2")  # fmt: skip
    driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "ALLCONV_TRACKING_PATIENCE_S": "5"})  # fmt: skip
    deadline = time.time() + 300
    while not list((storage / "gone").glob("trial_*")):  # a trial has started: the search is under way
        assert driver.poll() is None and time.time() < deadline, "no trial started"
        time.sleep(0.1)
    tracking_server.stop()
    stopped = time.time()
    assert results_so_far(storage / "gone") < 4, "the search finished before the server went away"
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output[-3000:]
    summary = json.loads((storage / "gone" / SUMMARY_FILE).read_text())
    assert summary["tracking"]["lost_writes"] > 0 and "no model was registered" in summary["tracking"]["error"]
    assert summary["trials"] == 2 and summary["best"]["test_acc"] > 0  # the search itself is whole
    assert time.time() - stopped < 240
