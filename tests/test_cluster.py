"""Cluster runs: the cluster files pass Ray's own validation, and the search runs on a real
multi-node Ray cluster (a head and two 2-GPU workers, simulated on this machine), survives
losing a worker, and refuses storage that not every node can see."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from mlflow import MlflowClient
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.cluster_utils import Cluster

from tests.helpers import search_command, trial_histories
from tuning.cluster import unshared_nodes
from tuning.search import SUMMARY_FILE
from tuning.tracking import CHAMPION

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = ["cluster.yaml", "cluster-onprem.yaml"]


def ray_checked(config: dict) -> dict:
    """What `ray up` does to a cluster file before it launches anything."""
    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_files_pass_rays_validation(name):
    prepared = ray_checked(yaml.safe_load((REPO / name).read_text()))
    for node_type in prepared["available_node_types"].values():
        assert node_type["min_workers"] <= node_type["max_workers"]
    commands = " ".join(prepared["head_start_ray_commands"])
    assert "mlflow server" in commands and "--host 0.0.0.0" not in commands  # never bound publicly
    assert "RAY_AUTH_MODE=token" in commands and "RAY_AUTH_MODE=token" in " ".join(prepared["worker_start_ray_commands"])


def test_aws_cluster_has_cpu_head_and_gpu_workers_that_scale_to_zero():
    prepared = ray_checked(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith("m")
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != prepared["head_node_type"]}
    assert {"spot"} <= {v["node_config"].get("InstanceMarketOptions", {}).get("MarketType", "on-demand") for v in workers.values()}
    assert "on-demand" in {v["node_config"].get("InstanceMarketOptions", {}).get("MarketType", "on-demand") for v in workers.values()}
    assert all(v["min_workers"] == 0 for v in workers.values()) and prepared["idle_timeout_minutes"] > 0


@pytest.mark.parametrize(
    "name, misspell",
    [("cluster.yaml", lambda c: c.__setitem__("idle_timeout_minute", c.pop("idle_timeout_minutes"))),
     ("cluster.yaml", lambda c: c["available_node_types"]["gpu_8x"].__setitem__("max_worker", 1)),
     ("cluster.yaml", lambda c: c.__setitem__("setup_command", c.pop("setup_commands"))),
     ("cluster-onprem.yaml", lambda c: c.__setitem__("file_mount", c.pop("file_mounts"))),
     ("cluster-onprem.yaml", lambda c: c.__setitem__("head_start_commands", c.pop("head_start_ray_commands")))],
)  # fmt: skip
def test_a_misspelt_key_fails_rays_validation(name, misspell):
    config = yaml.safe_load((REPO / name).read_text())
    misspell(config)
    with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed"):
        ray_checked(config)


def test_nodes_that_do_not_see_the_marker_are_named():
    assert unshared_nodes({"10.0.0.1 (head)": "t0k", "10.0.0.2 (a)": None, "10.0.0.3 (b)": "old"}, "t0k") == [
        "10.0.0.2 (a)",
        "10.0.0.3 (b)",
    ]
    assert unshared_nodes({"10.0.0.1 (head)": "t0k"}, "t0k") == []


# ---------------------------------------------------------------- a real multi-node cluster


@pytest.fixture
def gpu_cluster():
    """A head with no GPU and two workers with 2 (logical) GPUs each, as separate Ray nodes."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2, num_gpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()


def search_argv(cluster: Cluster, data: Path, storage: Path, name: str, *extra: str) -> list[str]:
    uri = f"sqlite:///{storage.parent}/mlflow.db"
    return search_command(data, storage, name, uri, "--address", cluster.address, "--cpus-per-trial", "0.5", *extra)


def most_at_once(histories: list[list[dict]]) -> int:
    """Trials running at the same moment, from each trial's results. Tune's timestamps are whole
    seconds, so each span is shrunk to the part it surely covers."""
    events = []
    for history in histories:
        last = history[-1]
        events += [(last["timestamp"] + 1 - last["time_total_s"], 1), (last["timestamp"], -1)]
    running = most = 0
    for _, change in sorted(events, key=lambda e: (e[0], e[1])):
        running += change
        most = max(most, running)
    return most


@pytest.mark.slow
def test_search_on_a_multi_node_cluster(gpu_cluster, cifar_jpeg_dir, tmp_path):
    cluster, workers = gpu_cluster
    shared = tmp_path / "shared"
    argv = search_argv(cluster, cifar_jpeg_dir, shared, "multi", "--gpus-per-trial", "1", "--num-samples", "6",
                       "--max-epochs", "2", "--grace-period", "2")  # fmt: skip
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    experiment = shared / "multi"
    histories = trial_histories(experiment)
    assert len(histories) == 6 and all(len(h) == 2 for h in histories)
    nodes = {row["node_id"] for history in histories for row in history}
    assert nodes == {worker.node_id for worker in workers}  # both workers, never the GPU-less head
    assert most_at_once(histories) == 4  # one trial per logical GPU, all four GPUs busy at once
    for trial in experiment.glob("trial_*"):
        assert list(trial.glob("checkpoint_*/checkpoint.pt")), f"no checkpoint in the shared path for {trial.name}"
    summary = json.loads((experiment / SUMMARY_FILE).read_text())
    assert Path(summary["best"]["checkpoint"]).is_relative_to(shared)

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.get_experiment_by_name("multi").experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.role = 'search'")
    children = client.search_runs([experiment_id], "tags.role = 'trial'")
    assert len(children) == 6 and all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert {c.data.tags["node_id"] for c in children} <= nodes
    version = client.get_model_version_by_alias("allconv-multi", CHAMPION)
    assert version.tags["search_run_id"] == parent.info.run_id


@pytest.mark.slow
def test_a_lost_worker_node_reschedules_its_trials_from_their_checkpoints(gpu_cluster, cifar_jpeg_dir, tmp_path):
    cluster, (kept, lost) = gpu_cluster
    shared = tmp_path / "shared"
    # No --gpus-per-trial: on a cluster with GPUs a trial takes one. No early stopping, so every
    # trial must reach the last epoch.
    argv = search_argv(cluster, cifar_jpeg_dir, shared, "lost", "--num-samples", "6", "--max-epochs", "4",
                       "--grace-period", "4", "--max-failures", "2")  # fmt: skip
    experiment = shared / "lost"
    driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    mid_way = False  # a trial on the worker to remove has reported its first epoch, not its last
    while time.time() < deadline and driver.poll() is None and not mid_way:
        time.sleep(0.5)
        histories = trial_histories(experiment, allow_empty=True)
        mid_way = any(h and h[-1]["node_id"] == lost.node_id and h[-1]["epoch"] < 3 for h in histories)
    assert driver.poll() is None and mid_way, "no trial was mid-way on the worker to remove"
    cluster.remove_node(lost, allow_graceful=False)
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output[-3000:]

    summary = json.loads((experiment / SUMMARY_FILE).read_text())
    assert summary["trials"] == 6 and summary["failed"] == 0
    assert all(row["state"] == "completed" and row["epochs"] == 4 for row in summary["leaderboard"])
    moved = 0
    for history in trial_histories(experiment):
        epochs = [row["epoch"] for row in history]
        before = [row["epoch"] for row in history if row["node_id"] == lost.node_id]
        after = [row["epoch"] for row in history if row["node_id"] == kept.node_id]
        if not (before and after):  # ran on one node only
            assert epochs == [1, 2, 3, 4], f"epochs repeated or missing: {epochs}"
            continue
        # It went on from its last checkpoint on the surviving worker, not from epoch 1. A result
        # already on its way when the node died can show that one epoch twice, never more.
        moved += 1
        assert before == list(range(1, len(before) + 1)) and after == list(range(after[0], 5)), epochs
        assert 1 < after[0] <= before[-1] + 1 and before[-1] - after[0] <= 1, epochs
    assert moved, "no trial moved to the surviving worker"


def node_with_private_mount(address: str, hidden: Path) -> subprocess.Popen:
    """A Ray worker node whose processes see an empty tmpfs at `hidden`: a machine without the
    shared mount (a private mount namespace, so only this node's processes see the tmpfs)."""
    script = f"mount -t tmpfs tmpfs {hidden} && exec ray start --address={address} --num-cpus=1 --num-gpus=1 --block"
    return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})  # fmt: skip


@pytest.mark.slow
def test_a_storage_path_that_a_node_cannot_see_is_refused(image_folder, tmp_path):
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare with mount namespaces (root)")
    storage = tmp_path / "ray_results"
    storage.mkdir()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    worker = node_with_private_mount(cluster.address, storage)
    try:
        ray.init(address=cluster.address)
        deadline = time.time() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert worker.poll() is None and time.time() < deadline, "the worker node did not join"
            time.sleep(0.5)
        ray.shutdown()
        argv = [sys.executable, "-m", "tuning.search", "--address", cluster.address, "--dataset", "folder",
                "--data", str(image_folder), "--val-size", "6", "--storage-path", str(storage),
                "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip
        run = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    finally:
        ray.shutdown()
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
        cluster.shutdown()
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"--storage-path {storage} is local to the driver's node: 1 of 2 nodes cannot see it" in run.stderr
    assert not list(storage.glob("*/trial_*"))  # refused before any trial
