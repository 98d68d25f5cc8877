"""Faults on purpose, for the reliability tests: a trial that raises, runs out of disk, diverges
or leaves a corrupt checkpoint, at a chosen epoch, in a real search.

Off unless $ALLCONV_FAULTS names a JSON file holding a list of faults, each
`{"kind": "raise" | "enospc" | "nan" | "corrupt", "at_epoch": K, "times": N}` ("corrupt" also
takes "experiment": the experiment folder, where it truncates the trial's newest checkpoint). The first trial to
reach epoch K claims a fault (one fault per trial) and it fires N times for that trial, so a
retried trial can fail again. Trials share the file under a lock, as they may run in parallel.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any

import torch

FAULTS_ENV = "ALLCONV_FAULTS"


class InjectedFault(RuntimeError):
    """A failure a test asked for."""


def claim(kind: str, trial_id: str, epoch: int) -> dict[str, Any] | None:
    """The fault of `kind` that fires now for this trial, counted as fired; None if none does."""
    path = os.environ.get(FAULTS_ENV)
    if not path:
        return None
    with open(path, "r+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        faults: list[dict[str, Any]] = json.load(file)
        claimed = any(fault.get("trial") == trial_id for fault in faults)
        for fault in faults:
            mine = fault.get("trial") == trial_id or (fault.get("trial") is None and not claimed)
            if fault["kind"] == kind and fault["at_epoch"] == epoch and fault.get("times", 1) > 0 and mine:
                fault.update(trial=trial_id, times=fault.get("times", 1) - 1)
                file.seek(0)
                file.truncate()
                json.dump(faults, file)
                return fault
    return None


def before_checkpoint(trial_id: str, epoch: int, directory: str) -> None:
    if claim("raise", trial_id, epoch):
        raise InjectedFault(f"injected failure in trial {trial_id} at epoch {epoch}")
    if claim("enospc", trial_id, epoch):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory)


def after_report(trial_id: str, epoch: int, weights: dict[str, torch.Tensor]) -> None:
    if claim("nan", trial_id, epoch):  # the state dict shares storage with the live model
        for tensor in weights.values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    if fault := claim("corrupt", trial_id, epoch):
        trial = Path(fault["experiment"]) / f"trial_{trial_id}"
        target = max(trial.glob("checkpoint_*"), key=lambda p: p.name) / "checkpoint.pt"
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])  # a half-written file
        raise InjectedFault(f"injected crash in trial {trial_id} after truncating {target}")
