"""One trial as Ray Tune runs it: a plain function around `tuning.training.fit`.

Trials only report to Tune (metrics and a checkpoint each epoch); they never talk to MLflow,
so a trial on any node needs nothing but its data, which arrives through the object store.
"""

from __future__ import annotations

import logging
import math
import tempfile
from typing import Any

import pyarrow.fs
import ray
import torch
from ray import tune

from tuning import faults
from tuning.config import METRIC, TrialConfig
from tuning.data import TrialData
from tuning.training import CorruptCheckpointError, DivergedError, fit, load_checkpoint, pick_device, save_checkpoint

log = logging.getLogger(__name__)


def run_trial(config: dict, data: TrialData) -> None:
    cfg = TrialConfig.from_dict(config)
    device = pick_device()  # the GPU share Ray assigned, or the CPU when it gave none
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every step has the same shape
        share = ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0)
        # Packed trials (a fractional GPU each) keep to their share of its memory, so one big
        # trial fails with its own out-of-memory error instead of starving its neighbours.
        torch.cuda.set_per_process_memory_fraction(float(min(share, 1.0)))  # the one GPU Ray exposes
    trial_id = tune.get_context().get_trial_id()
    where = {"device": str(device), "node_id": ray.get_runtime_context().get_node_id()}  # a retry may move
    resume_from = latest_intact(tune.get_checkpoint())
    epoch = resume_from["epoch"] if resume_from else 0
    try:
        for metrics, payload in fit(cfg, data, device, resume_from):
            epoch = metrics["epoch"]
            with tempfile.TemporaryDirectory() as directory:
                faults.before_checkpoint(trial_id, epoch, directory)
                save_checkpoint(directory, payload)
                tune.report({**metrics, **where}, checkpoint=tune.Checkpoint.from_directory(directory))
            faults.after_report(trial_id, epoch, payload["model"])
    except DivergedError as err:
        # Ends the trial, not as an error (a retry would diverge again) and not with a score:
        # Optuna is told NaN, which it records as a failed trial, and ASHA ignores NaN.
        tune.report({"epoch": epoch + 1, METRIC: math.nan, "val_loss": math.nan, "diverged": str(err), **where})


def latest_intact(latest: tune.Checkpoint | None) -> dict[str, Any] | None:
    """The newest of this trial's checkpoints that passes its checksum. Tune hands over the
    latest; if that one is truncated or corrupt, the trial goes on from the one before it."""
    if latest is None:
        return None
    filesystem = latest.filesystem
    folder = latest.path.rstrip("/").rsplit("/", 1)[0]
    siblings = filesystem.get_file_info(pyarrow.fs.FileSelector(folder))
    older = sorted((i.path for i in siblings if i.base_name.startswith("checkpoint_") and i.path < latest.path), reverse=True)
    for path in [latest.path, *older]:
        try:
            with tune.Checkpoint(path, filesystem).as_directory() as directory:
                return load_checkpoint(directory)
        except CorruptCheckpointError as err:
            log.warning("%s; falling back to the checkpoint before it", err)
    log.warning("no intact checkpoint left in %s; the trial starts again from epoch 1", folder)
    return None
