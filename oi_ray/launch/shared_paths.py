"""Paths every node must see before a run spreads over several nodes.

Rank 0 writes checkpoints wherever Ray places it, Ray Train writes its run state from every
worker, and every node decodes images: on more than one node, ``train.results_dir``,
``ray.storage_path`` and the images must be one shared filesystem (NFS, Lustre, EFS,
Filestore) or, for Ray Train storage, an object-store URI. The driver writes a marker into
each folder and a task pinned to each node that may host a worker reads it back; an image is
looked up by its size. A path some node does not see fails before any work starts, naming
the spec key, the path and the node.
"""

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from oi_ray.errors import ConfigError

log = logging.getLogger(__name__)
MARKER_PREFIX = ".oi-ray-shared-check-"
CHECK_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class SharedPath:
    """A path the run needs on every node, and the spec key it comes from."""

    key: str
    path: str  # a local path (made absolute here) or an object-store URI (not checked)
    is_folder: bool  # folders get a marker written and read back; files are looked up


def worker_nodes(cpus: float, gpus: float) -> list[dict]:
    """The alive nodes with room for one worker of ``cpus`` CPUs and ``gpus`` GPUs."""
    return [node for node in ray.nodes() if node["Alive"]
            and node["Resources"].get("CPU", 0) >= cpus and node["Resources"].get("GPU", 0) >= gpus]


def check_shared(paths: list[SharedPath], nodes: list[dict]) -> None:
    """Raise a :class:`ConfigError` for each of ``paths`` some of ``nodes`` do not see (the
    same content). One node or none: nothing to check."""
    if len(nodes) < 2:
        return
    expected, markers = {}, []
    for shared in paths:
        if "://" in shared.path:  # an object-store URI: Ray Train reaches it from every node
            continue
        path = Path(shared.path).resolve()
        if shared.is_folder:
            path.mkdir(parents=True, exist_ok=True)
            token = secrets.token_hex(8)
            marker = path / f"{MARKER_PREFIX}{token}"
            marker.write_text(token)
            markers.append(marker)
            expected[shared.key] = (str(marker), token)
        else:
            expected[shared.key] = (str(path), str(path.stat().st_size))
    try:
        looks = [_look.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node["NodeID"], soft=False)).remote(expected) for node in nodes]
        seen = [(node, _missing_on(node, look)) for node, look in zip(nodes, looks, strict=True)]
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)
    problems = [f"{shared.key}={shared.path} is not visible from node {node['NodeManagerAddress']} "
                f"(id {node['NodeID'][:12]})"
                for node, missing in seen for shared in paths if shared.key in missing]
    if problems:
        raise ConfigError(
            f"this run spreads over {len(nodes)} nodes, and each must see these paths:\n"
            + "\n".join(f"  - {problem}" for problem in problems)
            + "\nput them on a filesystem every node mounts at the same path (NFS, Lustre, EFS, Filestore; "
              "ray.storage_path may also be an s3:// or gs:// URI)")


def _missing_on(node: dict, look: ray.ObjectRef) -> list[str]:
    """The keys ``node`` does not see; none when the node left the cluster meanwhile (Ray lists a
    node that died as alive until its heartbeats are missed)."""
    try:
        return ray.get(look, timeout=CHECK_TIMEOUT_S)
    except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError):
        log.info("node %s (id %s) left the cluster during the shared-path check", node["NodeManagerAddress"],
                 node["NodeID"][:12])
        return []


@ray.remote
def _look(expected: dict[str, tuple[str, str]]) -> list[str]:
    """The keys whose marker (or file size) this node does not see as the driver wrote it."""
    missing = []
    for key, (path, content) in expected.items():
        target = Path(path)
        try:
            is_marker = target.name.startswith(MARKER_PREFIX)
            found = target.read_text() if is_marker else str(target.stat().st_size)
        except OSError:
            found = None
        if found != content:
            missing.append(key)
    return missing
