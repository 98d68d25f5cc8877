"""One trial as Ray Tune runs it: a plain function around `tuning.training.fit`.

Trials only report to Tune (metrics and a checkpoint each epoch); they never talk to MLflow,
so a trial on any node needs nothing but its data, which arrives through the object store.
"""

from __future__ import annotations

import tempfile

import ray
import torch
from ray import tune

from tuning.config import TrialConfig
from tuning.data import TrialData
from tuning.training import fit, load_checkpoint, pick_device, save_checkpoint


def run_trial(config: dict, data: TrialData) -> None:
    cfg = TrialConfig.from_dict(config)
    device = pick_device()  # the GPU share Ray assigned, or the CPU when it gave none
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every step has the same shape
    node = ray.get_runtime_context().get_node_id()  # a retried trial may land on another node
    resume_from = None
    if checkpoint := tune.get_checkpoint():
        with checkpoint.as_directory() as directory:
            resume_from = load_checkpoint(directory)
    for metrics, payload in fit(cfg, data, device, resume_from):
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(directory, payload)
            tune.report({**metrics, "device": str(device), "node_id": node}, checkpoint=tune.Checkpoint.from_directory(directory))
