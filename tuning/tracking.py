"""Where a search's results go: MLflow, written by the driver alone.

One parent run per search and one nested child run per trial (params, per-epoch metrics in one
batched request per trial per epoch, its end state as tags). Trials only report to Tune, so no
trial ever needs the tracking server. After the search the parent gets the search space, the
leaderboard, plots and the best model, which is registered and becomes the champion only if it
beats the current one on the test split.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import requests
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from ray import tune

from tuning.cluster import write_json
from tuning.config import METRIC

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow's embedded default: a file, no server
DEFAULT_EXPERIMENT = "allconv"
DEFAULT_REGISTERED_MODEL = "allconv-cifar10"
CHAMPION = "champion"
EPOCH_METRICS = ("train_loss", "val_loss", METRIC, "lr", "images_per_s", "epoch_seconds")
REACH_TIMEOUT_S = 5.0
RETRY_AFTER_S = 10.0  # while the tracking store is down, try again this often (not on every epoch)
# At the end, wait this long for it before counting the waiting writes as lost.
FINAL_FLUSH_S = float(os.environ.get("ALLCONV_TRACKING_PATIENCE_S", "60"))
# One tracking call fails in seconds, not minutes: the queue above does the waiting.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
LOST_WRITES_FILE = "tracking_lost.json"  # how many writes the search could not deliver
TRACKING_ERRORS = (MlflowException, requests.RequestException, OSError)


log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names its URI."""


def tracking_uri(flag: str | None) -> str:
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_reachable(uri: str) -> None:
    """One clear error, in bounded time, before any trial starts."""
    if uri.startswith(("http://", "https://")):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=REACH_TIMEOUT_S).raise_for_status()
        except requests.RequestException as err:
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({type(err).__name__}); start it, or pass --tracking-uri") from err
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow tracking store {uri}: folder {folder} is missing or not writable")
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:
        raise TrackingError(f"MLflow tracking store {uri} cannot be used ({err})") from err


def short(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:300]


def artifact_location(uri: str) -> str | None:
    """Beside a SQLite file, keep artifacts next to it rather than in whatever the cwd is."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None  # a server decides (--artifacts-destination)


def git_commit() -> str | None:
    try:
        # the user's checkout (the working directory), which an installed package is not in
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except OSError:
        return None
    return out.stdout.strip() or None


class SearchTracker(tune.Callback):
    """A Tune callback in the driver. It connects lazily and finds its runs by tags, so after
    `--resume` it re-attaches to the parent and child runs it made instead of duplicating them.

    Every write goes through a queue. While the tracking store is unreachable the writes wait
    there (training goes on) and are retried every RETRY_AFTER_S, in order, when the next one
    comes; `flush` at the end waits at most FINAL_FLUSH_S, then counts what is left as lost."""

    def __init__(self, uri: str, experiment: str, search: str, max_epochs: int, results_path: str):
        self.uri, self.experiment, self.search, self.max_epochs = uri, experiment, search, max_epochs
        self.results_path = results_path  # the search's folder: where writes that never got through are counted
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._parent: str | None = None
        self._children: dict[str, str] = {}
        self._queue: list[tuple[str, str, dict[str, Any]]] = []  # (trial id, operation, its arguments)
        self._retry_at = 0.0
        self._down_since: float | None = None

    def __getstate__(self) -> dict:  # Tune pickles its callbacks; a client holds connections
        return {**self.__dict__, "_client": None, "_experiment_id": None, "_parent": None, "_children": {}, "_queue": []}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            self._experiment_id = (
                found.experiment_id if found else self.client.create_experiment(self.experiment, artifact_location(self.uri))
            )
        return self._experiment_id

    def runs(self, filter_string: str) -> list:
        return list(self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=10_000))

    @property
    def parent_run_id(self) -> str:
        if self._parent is None:
            found = self.runs(f"tags.search = '{self.search}' and tags.role = 'search'")
            self._parent = found[0].info.run_id if found else self.client.create_run(
                self.experiment_id, run_name=self.search, tags={"search": self.search, "role": "search"}
            ).info.run_id
            for run in self.runs(f"tags.search = '{self.search}' and tags.role = 'trial'"):
                self._children[run.data.tags["trial_id"]] = run.info.run_id
        return self._parent

    def child_run_id(self, trial_id: str, params: dict[str, Any] | None = None) -> str:
        parent = self.parent_run_id
        if trial_id not in self._children:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"trial_{trial_id}",
                tags={"mlflow.parentRunId": parent, "search": self.search, "role": "trial", "trial_id": trial_id},
            )
            self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in sorted((params or {}).items())])
            self._children[trial_id] = run.info.run_id
        return self._children[trial_id]

    # ---- the queue

    def _send(self, trial_id: str, operation: str, **arguments) -> None:
        self._queue.append((trial_id, operation, arguments))
        if time.time() >= self._retry_at:
            self.flush(patience_s=0)

    def _apply(self, trial_id: str, operation: str, arguments: dict[str, Any]) -> None:
        if operation == "start":  # a new trial, or one resumed after a failure or a kill
            run = self.child_run_id(trial_id, arguments["params"])
            if self.client.get_run(run).info.status != "RUNNING":
                self.client.update_run(run, status="RUNNING")
        elif operation == "log":
            self.client.log_batch(self.child_run_id(trial_id), metrics=arguments["metrics"], tags=arguments["tags"])
        elif operation == "end":
            run = self.child_run_id(trial_id)
            self.client.log_batch(run, tags=arguments["tags"])
            self.client.set_terminated(run, arguments["status"])

    def flush(self, patience_s: float = FINAL_FLUSH_S) -> int:
        """Sends the queued writes in order, retrying for up to `patience_s`; returns how many are left."""
        deadline = time.time() + patience_s
        while self._queue:
            try:
                self._apply(*self._queue[0])
            except TRACKING_ERRORS as err:
                if self._down_since is None:
                    self._down_since = time.time()
                    log.warning("MLflow at %s is unreachable (%s); training goes on, its metrics wait", self.uri, short(err))
                if time.time() + RETRY_AFTER_S > deadline:
                    self._retry_at = time.time() + RETRY_AFTER_S
                    return len(self._queue)
                time.sleep(RETRY_AFTER_S)
                continue
            self._queue.pop(0)
        if self._down_since is not None:
            log.warning("MLflow at %s is back after %.0f s; the waiting writes are sent", self.uri, time.time() - self._down_since)
            self._down_since = None
        return 0

    # ---- Tune's hooks

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._send(trial.trial_id, "start", params=dict(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        step = int(result["epoch"])
        stamp = int(time.time() * 1000)
        # NaN (a diverged epoch) is left out: it would only flatten every chart of the run
        metrics = [Metric(k, float(result[k]), stamp, step) for k in EPOCH_METRICS if k in result and math.isfinite(result[k])]
        # where it ran, as of its latest epoch (a retried trial may move to another node)
        tags = [RunTag(key, str(result[key])) for key in ("device", "node_id", "diverged") if key in result]
        self._send(trial.trial_id, "log", metrics=metrics, tags=tags)  # one request per epoch

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        epochs = int(last.get("epoch", 0))
        if last.get("diverged"):
            state, status = "diverged", "FAILED"
        else:
            state, status = ("completed" if epochs >= self.max_epochs else "stopped_early"), "FINISHED"
        tags = [RunTag("end_state", state), RunTag("epochs_run", str(epochs))]
        if state != "completed":
            tags.append(RunTag("stopped_at_epoch", str(epochs)))
        self._send(trial.trial_id, "end", tags=tags, status=status)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        # Tune has just written the error on the driver; its copy in storage is synced later.
        error_file = Path(trial.error_file) if trial.error_file else None
        lines = error_file.read_text().strip().splitlines() if error_file and error_file.exists() else []
        message = (lines[-1] if lines else "the trial raised an error")[:4000]  # the exception, not the traceback
        self._send(trial.trial_id, "end", tags=[RunTag("end_state", "failed"), RunTag("error", message)], status="FAILED")

    def on_experiment_end(self, trials, **info) -> None:
        lost = self.flush()
        if lost:
            log.warning("MLflow at %s stayed unreachable for %.0f s: %d writes lost", self.uri, FINAL_FLUSH_S, lost)
        write_json(f"{self.results_path}/{LOST_WRITES_FILE}", {"uri": self.uri, "lost_writes": lost})

    # ---- after the search

    def close_unfinished(self, reason: str, keep: set[str] = frozenset()) -> int:
        """Marks this search's child runs that are still RUNNING (except `keep`) as KILLED: trials
        an interrupt stopped, or ones a killed driver had started but Tune never recorded."""
        closed = 0
        for run in self.runs(f"tags.search = '{self.search}' and tags.role = 'trial' and attributes.status = 'RUNNING'"):
            if run.data.tags.get("trial_id") not in keep:
                self.client.log_batch(run.info.run_id, tags=[RunTag("end_state", reason)])
                self.client.set_terminated(run.info.run_id, "KILLED")
                closed += 1
        return closed

    def finish(self, summary: dict[str, Any], space_text: str, args: dict[str, Any], plots: dict[str, Any]) -> None:
        run = self.parent_run_id
        client = self.client
        client.log_text(run, space_text, "search_space.yaml")
        client.log_dict(run, args, "cli_args.json")
        client.log_text(run, leaderboard_csv(summary["leaderboard"]), "leaderboard.csv")
        for name, figure in plots.items():
            client.log_figure(run, figure, f"plots/{name}.png")
        tags = [RunTag("space", str(args.get("space"))), RunTag("end_state", "completed")]
        if commit := git_commit():
            tags.append(RunTag("mlflow.source.git.commit", commit))
        stamp = int(time.time() * 1000)
        metrics = [Metric(k, float(summary[k]), stamp, 0) for k in ("trials", "stopped_early", "failed", "epochs_run", "budget_fraction")]
        params = [Param(k, str(v)[:6000]) for k, v in sorted(args.items())]
        if best := summary.get("best"):
            metrics += [Metric(f"best_{METRIC}", best[METRIC], stamp, 0), Metric("best_test_acc", best["test_acc"], stamp, 0)]
            params += [Param(f"best.{k}", str(v)) for k, v in sorted(best["config"].items())]
            tags.append(RunTag("best_trial_id", str(best["trial_id"])))
        client.log_batch(run, metrics=metrics, params=params, tags=tags)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_run_id, status)


def leaderboard_csv(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# ---------------------------------------------------------------- the best model


def register_champion(
    uri: str, parent_run_id: str, model, example, test_acc: float, name: str, classes: list[str] | None = None
) -> dict[str, Any]:
    """Logs `model` on the parent run, registers it under `name`, and moves the champion alias
    to it only if it beats the current champion's test accuracy."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    model = model.cpu().eval()
    with mlflow.start_run(run_id=parent_run_id):
        with torch.no_grad():
            output = model(torch.as_tensor(example)).numpy()
        info = mlflow.pytorch.log_model(
            model, name="model", signature=infer_signature(example, output), input_example=example,
            registered_model_name=name, await_registration_for=60, metadata={"classes": list(classes or [])},
            # pickle: saved in milliseconds and loads at any batch size; it needs the `model`
            # package (this project) installed where it is loaded. pt2 needs nothing but took
            # tens of seconds per model to export here.
            serialization_format="pickle",
            # Said outright: MLflow's own inference runs the model in a subprocess (~10 s here).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "allconv-tune"],
        )  # fmt: skip
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, "test_acc", f"{test_acc:.6f}")
    client.set_model_version_tag(name, version, "search_run_id", parent_run_id)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        current_acc = float(current.tags.get("test_acc", "-inf"))
    except Exception:  # no champion yet
        current, current_acc = None, float("-inf")
    promoted = test_acc > current_acc
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    return {
        "registered_model": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "champion": promoted,
        "previous_champion": None if current is None else {"version": current.version, "test_acc": current_acc},
    }
