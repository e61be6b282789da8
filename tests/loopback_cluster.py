"""A real multi-node Ray cluster on 127.0.0.1 for tests: ``ray start --block`` per node.

Every node is one ``ray start --block`` process that leads its own process group (Ray's
processes of that node stay in it), so a test stops exactly the nodes it started, by their
process group ids, never by stopping Ray by name. ``kill_node`` is a node failure (SIGKILL).
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from helpers import free_port

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 120
OBJECT_STORE_BYTES = 256 * 1024 * 1024  # per node; tests move little data


class LoopbackCluster:
    """A head node (the job server on 127.0.0.1) and worker nodes added one by one."""

    def __init__(self, head_cpus: int = 0, token: str | None = None) -> None:
        """``token``: the cluster requires Ray token authentication with this token (else none)."""
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        # short: Ray's Unix sockets live below it (108-byte path limit)
        self.temp_dir = tempfile.mkdtemp(prefix="oir-", dir="/tmp")
        # the jobs' `python` is this interpreter, as on a cluster whose image has oi-ray installed
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token} if token else {"RAY_AUTH_MODE": "disabled"}
        self.env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PATH": path, **auth}
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.nodes: dict[str, subprocess.Popen] = {}
        self.logs = Path(self.temp_dir) / "node-logs"
        self.logs.mkdir()
        try:
            self._start_head(head_cpus)
        except BaseException:
            self.shutdown()
            raise

    def _start_head(self, head_cpus: int, attempts: int = 3) -> None:
        """Start the head; the free ports picked can be taken by another process before Ray binds
        them, so a head that exits for a port in use is started again on new ports."""
        for attempt in range(1, attempts + 1):
            self._start("head", ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                                 f"--temp-dir={self.temp_dir}", f"--num-cpus={head_cpus}"])
            try:
                self._wait(lambda: len(self.alive_nodes()) == 1, "the head node")
                return
            except RuntimeError as error:
                if "address already in use" not in str(error) or attempt == attempts:
                    raise
                self._stop("head")
                self.gcs_port, self.dashboard_port = free_port(), free_port()

    @property
    def address(self) -> str:
        """The job server URL (``--address``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add_node(self, name: str, num_cpus: int = 1, prefix: list[str] | None = None) -> None:
        """Start a worker node; ``prefix`` wraps its command (e.g. in another mount namespace).
        One at a time: nodes registering together overload the GCS of a 2-core machine (their
        registration times out)."""
        count = len(self.alive_nodes())
        self._start(name, [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}",
                           f'--resources={{"{name}": 1}}'], prefix)
        self._wait(lambda: len(self.alive_nodes()) == count + 1, f"node {name}")

    def kill_node(self, name: str) -> None:
        """A node failure: SIGKILL to the node's process group."""
        process = self.nodes.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def alive_nodes(self) -> list[dict]:
        try:
            request = urllib.request.Request(f"{self.address}/api/v0/nodes?limit=100", headers=self.headers)
            with urllib.request.urlopen(request, timeout=5) as response:
                nodes = json.load(response)["data"]["result"]["result"]
        except OSError:
            return []
        return [node for node in nodes if node["state"] == "ALIVE"]

    def shutdown(self) -> None:
        """Stop every node this cluster started (the workers together, then the head), then
        remove its files."""
        self._stop(*[name for name in self.nodes if name != "head"])
        self._stop("head")
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _stop(self, *names: str) -> None:
        """SIGTERM to each named node's process group at once, then wait for them all (SIGKILL
        to a group that lingers)."""
        stopping = []
        for name in names:
            process = self.nodes.pop(name, None)
            with contextlib.suppress(ProcessLookupError):  # the group is gone already
                if process is not None:
                    os.killpg(process.pid, signal.SIGTERM)
                    stopping.append(process)
        deadline = time.monotonic() + 10
        for process in stopping:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)

    def _start(self, name: str, arguments: list[str], prefix: list[str] | None = None) -> None:
        # every node's dashboard agent needs its own HTTP port on this one machine (Ray's default is fixed)
        command = [*(prefix or []), RAY, "start", "--block", "--node-ip-address=127.0.0.1",
                   "--disable-usage-stats", f"--object-store-memory={OBJECT_STORE_BYTES}",
                   f"--dashboard-agent-listen-port={free_port()}", *arguments]
        with (self.logs / f"{name}.log").open("w") as log:
            self.nodes[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            for name, process in self.nodes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited: {(self.logs / f'{name}.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up in {START_TIMEOUT_S} s")
            time.sleep(1)
