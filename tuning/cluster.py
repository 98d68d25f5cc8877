"""Ray for the driver: joining or starting a cluster, checking that it can run the search at all,
and the storage path that every node reads and writes (local dir, shared file system or s3://).

Everything here runs before the first trial, so a cluster that cannot work is one clear error
rather than trials that hang, or checkpoints scattered over the workers' own disks.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
from ray._private.state import state as cluster_state
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

PROBE_TIMEOUT_S = 60.0  # a node that cannot run a zero-CPU task in a minute is not usable anyway


class ClusterError(RuntimeError):
    """The cluster cannot run this search; the message says what to change."""


def start_ray(address: str | None, num_gpus: float | None) -> None:
    if ray.is_initialized():  # the caller (a test, a notebook) started Ray already
        return
    try:
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", num_gpus=num_gpus)  # a new Ray of its own, even if one runs here
    except ConnectionError as err:
        raise ClusterError(f"cannot reach a Ray cluster at --address {address} ({err})") from err


# ---------------------------------------------------------------- what the cluster can hold


def node_shapes() -> list[dict[str, float]]:
    """The resources of every live node, and of every node type the autoscaler may still add
    (when it reports its config), so a GPU type at zero workers still counts."""
    shapes = [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]
    config = cluster_state.get_cluster_config()
    if config is not None:
        shapes += [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]
    return shapes


def capacity(resource: str) -> float:
    """How much of a resource the search can count on: what is present, or the autoscaler's
    maximum when it reports one."""
    present = ray.cluster_resources().get(resource, 0)
    most = cluster_state.get_max_resources_from_cluster_config() or {}
    return max(present, float(most.get(resource, 0)))


def check_fits_a_trial(cpus_per_trial: float, gpus_per_trial: float) -> None:
    """A trial bigger than every node would wait forever; say so now instead. Node types the
    autoscaler may add count (Ray's v2 autoscaler reports them; cluster.yaml turns it on)."""
    shapes = node_shapes()
    if any(s.get("CPU", 0) >= cpus_per_trial and s.get("GPU", 0) >= gpus_per_trial for s in shapes):
        return
    most_gpus = max((s.get("GPU", 0) for s in shapes), default=0)
    most_cpus = max((s.get("CPU", 0) for s in shapes), default=0)
    problem = (
        f"--gpus-per-trial {gpus_per_trial:g} does not fit: the largest node has {most_gpus:g} GPUs "
        f"(cluster total {ray.cluster_resources().get('GPU', 0):g})"
        if gpus_per_trial > most_gpus
        else f"--cpus-per-trial {cpus_per_trial:g} does not fit: the largest node has {most_cpus:g} CPUs"
    )
    raise ClusterError(problem)


def default_gpus_per_trial() -> float:
    """On a cluster joined with --address: one GPU per trial when it has (or can add) GPUs."""
    return 1.0 if capacity("GPU") > 0 else 0.0


def trial_slots(cpus_per_trial: float, gpus_per_trial: float, planned_gpus: float | None, max_concurrent: int) -> int:
    """How many trials run at once. Tune needs it said: with a custom searcher it otherwise
    starts one trial at a time, and short trials then never overlap. `planned_gpus` (--num-gpus
    on a cluster) is what an autoscaling cluster should grow to; GPU nodes bring their own CPUs."""
    if max_concurrent:
        return max_concurrent
    if gpus_per_trial and planned_gpus:
        return max(1, int(planned_gpus // gpus_per_trial))
    slots = capacity("CPU") // cpus_per_trial
    if gpus_per_trial:
        slots = min(slots, capacity("GPU") // gpus_per_trial)
    return max(1, int(slots))


# ---------------------------------------------------------------- storage every node shares


def is_remote(storage: str) -> bool:
    return "://" in storage


def resolve_storage(path: str) -> str:
    return path if is_remote(path) else str(Path(path).expanduser().resolve())


def _read_marker(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def unshared_nodes(seen_by_node: dict[str, str | None], marker: str) -> list[str]:
    return sorted(node for node, seen in seen_by_node.items() if seen != marker)


def check_storage_shared(storage: str) -> None:
    """On a multi-node cluster a local --storage-path must be one file system that every node
    mounts at the same path; otherwise each trial checkpoints to its own node's disk, and a trial
    moved to another node, a resumed search or the final model cannot find it. Every live node
    reads a marker the driver writes there. (s3:// and other URIs are shared by definition.)"""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if is_remote(storage) or len(nodes) < 2:
        return
    Path(storage).mkdir(parents=True, exist_ok=True)
    marker = Path(storage) / f".shared-check-{secrets.token_hex(8)}"
    token = secrets.token_hex(16)
    marker.write_text(token)
    probe = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
    try:
        refs = {
            f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})": probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(marker))
            for node in nodes
        }
        seen = dict(zip(refs, ray.get(list(refs.values()), timeout=PROBE_TIMEOUT_S)))
    finally:
        marker.unlink(missing_ok=True)
    if missing := unshared_nodes(seen, token):
        raise ClusterError(
            f"--storage-path {storage} is local to the driver's node: {len(missing)} of {len(nodes)} nodes "
            f"cannot see it ({', '.join(missing)}). On a multi-node cluster use s3://BUCKET/PATH or a file "
            "system mounted at the same path on every node."
        )


def write_text(path: str, text: str) -> None:
    """Writes a small file into the storage path, local or s3://, through the same file system
    layer Ray Tune uses for its checkpoints."""
    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as out:
        out.write(text.encode())


def read_text(path: str) -> str | None:
    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(inner) as stream:
        return stream.read().decode()


def searches_by_age(storage: str, marker_file: str) -> list[str]:
    """Names of the searches in `storage` (folders holding `marker_file`), oldest first."""
    fs, inner = pyarrow.fs.FileSystem.from_uri(storage)
    try:
        folders = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    except OSError:
        return []
    markers = fs.get_file_info([f"{info.path}/{marker_file}" for info in folders if info.type == pyarrow.fs.FileType.Directory])
    found = [(info.mtime_ns or 0, info.path.rsplit("/", 2)[-2]) for info in markers if info.type == pyarrow.fs.FileType.File]
    return [name for _, name in sorted(found)]


def write_json(path: str, value: dict[str, Any]) -> None:
    write_text(path, json.dumps(value, indent=2, default=str))
