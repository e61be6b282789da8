"""A Ray autoscaler node provider for tests of ``--cluster``: the "machines" are this one.

Ray's cluster launcher (``ray up``, the autoscaler SDK) drives it as it drives a cloud: it asks
for a head node, runs the YAML's setup and start commands on it through the command runner,
and reads its IP. Here a node is a record in a JSON file, its IP is 127.0.0.1, and a command
"on the node" is a local shell command (``~`` is the launcher process's HOME). Named in a
launcher YAML as ``provider: {type: external, module: local_node_provider.LocalNodeProvider,
state_file: ...}`` with this folder on ``PYTHONPATH``.
"""

import json
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

from ray.autoscaler.command_runner import CommandRunnerInterface
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME


class LocalNodeProvider(NodeProvider):
    """Nodes are entries of ``provider.state_file``; all of them are this machine."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        self.state_file = Path(provider_config["state_file"])

    def _nodes(self) -> dict[str, dict[str, str]]:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def _save(self, nodes: dict[str, dict[str, str]]) -> None:
        self.state_file.write_text(json.dumps(nodes))

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        return [node_id for node_id, tags in self._nodes().items()
                if tags.get(TAG_RAY_CLUSTER_NAME) == self.cluster_name
                and all(tags.get(key) == value for key, value in tag_filters.items())]

    def is_running(self, node_id: str) -> bool:
        return node_id in self._nodes()

    def is_terminated(self, node_id: str) -> bool:
        return node_id not in self._nodes()

    def node_tags(self, node_id: str) -> dict[str, str]:
        return dict(self._nodes()[node_id])

    def external_ip(self, node_id: str) -> str:
        return "127.0.0.1"

    def internal_ip(self, node_id: str) -> str:
        return "127.0.0.1"

    def create_node(self, node_config: dict[str, Any], tags: dict[str, str], count: int) -> None:
        nodes = self._nodes()
        for _ in range(count):
            nodes[uuid.uuid4().hex[:12]] = {**tags, TAG_RAY_CLUSTER_NAME: self.cluster_name}
        self._save(nodes)

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        nodes = self._nodes()
        nodes[node_id].update(tags)
        self._save(nodes)

    def terminate_node(self, node_id: str) -> None:
        nodes = self._nodes()
        nodes.pop(node_id, None)
        self._save(nodes)

    def get_command_runner(self, log_prefix: str, node_id: str, auth_config: dict[str, Any], cluster_name: str,
                           process_runner: Any, use_internal_ip: bool,
                           docker_config: dict[str, Any] | None = None) -> CommandRunnerInterface:
        return LocalCommandRunner()

    @staticmethod
    def bootstrap_config(cluster_config: dict[str, Any]) -> dict[str, Any]:
        return cluster_config


class LocalCommandRunner(CommandRunnerInterface):
    """Runs a node's commands in a local shell; file syncs are local copies."""

    def run(self, cmd: str | None = None, timeout: int = 120, exit_on_fail: bool = False,
            port_forward: Any = None, with_output: bool = False,
            environment_variables: dict[str, object] | None = None, run_env: str = "auto",
            ssh_options_override_ssh_key: str = "", shutdown_after_run: bool = False) -> str:
        if not cmd:
            return ""
        exports = "".join(f"export {name}={shlex.quote(value if isinstance(value, str) else json.dumps(value))}; "
                          for name, value in (environment_variables or {}).items())
        done = subprocess.run(exports + cmd, shell=True, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
        return done.stdout if with_output else ""

    def run_rsync_up(self, source: str, target: str, options: dict[str, Any] | None = None) -> None:
        self._copy(source, target)

    def run_rsync_down(self, source: str, target: str, options: dict[str, Any] | None = None) -> None:
        self._copy(source, target)

    def _copy(self, source: str, target: str) -> None:
        source_path, target_path = Path(source).expanduser(), Path(target).expanduser()
        target_path.parent.mkdir(parents=True, exist_ok=True)
        if source_path.is_dir():
            shutil.copytree(source_path, target_path, dirs_exist_ok=True)
        else:
            shutil.copy2(source_path, target_path)

    def remote_shell_command_str(self) -> str:
        return "bash"
