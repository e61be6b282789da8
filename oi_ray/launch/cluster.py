"""``--cluster cluster.yaml``: bring up (or find) the cluster a Ray launcher YAML describes, and
reach its job server.

The YAML is Ray's own cluster-launcher format, unchanged (see ``cluster/``). Bring-up goes
through Ray's autoscaler SDK and is idempotent: a cluster that is up is left as it is (Ray is
not restarted, running jobs go on). The job server is reached directly on the head's
dashboard port when it answers, else through an SSH tunnel (``ray dashboard``) for as long
as the command runs.
"""

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from ray.autoscaler.sdk import create_or_update_cluster, get_head_node_ip

from oi_ray.errors import ConfigError
from oi_ray.ray_internals import checked_cluster_config

log = logging.getLogger(__name__)
DASHBOARD_PORT = 8265  # Ray's default
CONNECT_TIMEOUT_S = 5.0
TUNNEL_TIMEOUT_S = 60.0


@contextmanager
def cluster_job_server(cluster_yaml: Path) -> Iterator[str]:
    """Bring up the cluster of ``cluster_yaml``; yield its job server URL while it is reachable."""
    config = _read(cluster_yaml)
    log.info("bringing up Ray cluster %r from %s (nothing changes if it is up)", config["cluster_name"],
             cluster_yaml)
    create_or_update_cluster(str(cluster_yaml), no_restart=True)
    head = get_head_node_ip(str(cluster_yaml))
    port = _dashboard_port(config)
    if _answers(head, port):
        yield f"http://{head}:{port}"
        return
    log.info("the job server on %s:%d is not reachable from here: tunnelling to it over SSH", head, port)
    with _tunnel(cluster_yaml, port) as local_port:
        yield f"http://127.0.0.1:{local_port}"


def _read(cluster_yaml: Path) -> dict:
    """The launcher config, checked against Ray's own schema."""
    try:
        config = yaml.safe_load(cluster_yaml.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"--cluster {cluster_yaml}: cannot read it: {error}") from None
    if not isinstance(config, dict) or "cluster_name" not in config:
        raise ConfigError(f"--cluster {cluster_yaml}: not a Ray cluster-launcher YAML (no cluster_name)")
    try:
        checked_cluster_config(config)
    except KeyError as error:  # a provider without defaults and a section left out
        raise ConfigError(f"--cluster {cluster_yaml}: missing section {error}") from None
    except Exception as error:  # jsonschema.ValidationError, ValueError: Ray's checks
        raise ConfigError(f"--cluster {cluster_yaml}: {str(error).splitlines()[0]}") from None
    return config


def _dashboard_port(config: dict) -> int:
    """The head's dashboard port: ``--dashboard-port`` in its start commands, else Ray's default."""
    for line in config.get("head_start_ray_commands", []):
        found = re.search(r"--dashboard-port[= ](\d+)", line)
        if found:
            return int(found.group(1))
    return DASHBOARD_PORT


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError:
        return False
    return True


@contextmanager
def _tunnel(cluster_yaml: Path, remote_port: int) -> Iterator[int]:
    """Ray's ``ray dashboard`` SSH port-forward, stopped (its own process group) on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local_port = probe.getsockname()[1]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    with tempfile.TemporaryFile() as errors:
        tunnel = subprocess.Popen([ray_cli, "dashboard", str(cluster_yaml), "--port", str(local_port),
                                   "--remote-port", str(remote_port)],
                                  stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)
        try:
            deadline = time.monotonic() + TUNNEL_TIMEOUT_S
            while not _answers("127.0.0.1", local_port):
                if tunnel.poll() is not None or time.monotonic() > deadline:
                    errors.seek(0)
                    raise ConfigError(f"--cluster {cluster_yaml}: no tunnel to the job server on port "
                                      f"{remote_port}: {errors.read().decode(errors='replace')[-500:]}")
                time.sleep(0.5)
            yield local_port
        finally:
            if tunnel.poll() is None:
                os.killpg(tunnel.pid, signal.SIGTERM)
                tunnel.wait(timeout=10)
