"""Helpers the test modules share: a search's command line, reading its results, and a real MLflow server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def search_command(data: Path, storage: Path, name: str, uri: str, *extra: str) -> list[str]:
    """`python -m tuning.search` of the smoke space on 1,024 real training images; its MLflow
    experiment and registered model are named after the search."""
    return [sys.executable, "-m", "tuning.search", "--space", "smoke", "--dataset", "folder", "--data", str(data),
            "--train-limit", "1024", "--val-size", "500", "--storage-path", str(storage), "--name", name,
            "--tracking-uri", uri, "--experiment", name, "--registered-model", f"allconv-{name}", *extra]  # fmt: skip


def trial_histories(experiment: Path, allow_empty: bool = False, only: str = "trial_*") -> list[list[dict]]:
    """Each trial's reported results, from its result.json, in folder order."""
    histories = []
    for trial in sorted(experiment.glob(only)):
        results = trial / "result.json"
        if allow_empty and not results.exists():
            histories.append([])
            continue
        histories.append([json.loads(line) for line in results.read_text().splitlines() if line.strip()])
    return histories


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TrackingServer:
    """A real `mlflow server` on localhost, over `backend`, that a test can stop and start again."""

    def __init__(self, backend: str, artifacts: Path | None = None):
        self.backend, self.artifacts, self.port, self.process = backend, artifacts, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> None:
        argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1", "--backend-store-uri", self.backend]  # fmt: skip
        if self.artifacts is not None:
            argv += ["--artifacts-destination", str(self.artifacts)]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if requests.get(f"{self.uri}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                time.sleep(0.5)
        self.stop()
        raise AssertionError(f"mlflow server did not answer in {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
