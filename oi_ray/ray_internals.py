"""Every use of Ray that is not Ray's public API, in one place.

Ray 2.60 has no public call for these, so oi-ray reaches into Ray's private modules, passes
an underscore argument or recognises one of Ray's messages. The ``==2.60.*`` pin keeps them
working; ``tests/test_ray_internals.py`` checks each one against the installed Ray, so the next
Ray upgrade fails there, loudly and all at once, instead of one user's command at a time. The
rest of the package calls Ray's public API or this module.
"""

from typing import Any

# Ray's job server answers this while its agent is still starting (a head that just came up).
NO_JOB_AGENT_MESSAGE = "No available agent to submit job"
# The logger of Ray's job SDK: it logs "WebSocket closed" at INFO when a log tail ends.
JOB_SDK_LOGGER = "ray.dashboard.modules.job.sdk"
# ray.init's argument for the Prometheus metrics port of a Ray that oi-ray starts.
METRICS_EXPORT_PORT_ARGUMENT = "_metrics_export_port"


def exception_line(message: str) -> str | None:
    """The exception a Ray failure message ends with (``"ValueError: ..."``), or None for an
    empty message: a task's error (``RayTaskError``), a Tune trial's error and a Serve
    deployment's status message print the traceback first and the exception on the last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else None


def bootstrap_address(address: str) -> str:
    """The GCS address ``ray.init(address=...)`` would join (``auto`` -> the local cluster's);
    ``ConnectionError`` when ``auto`` finds none."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address)


def metrics_export_port(port: int | None) -> dict[str, Any]:
    """``ray.init`` keyword arguments that export a started Ray's metrics on ``port``."""
    return {METRICS_EXPORT_PORT_ARGUMENT: port}


def start_serve(http_options: dict[str, Any], proxy_location: Any) -> Any:
    """Start (or find) Ray Serve on the connected Ray, as ``serve run <config>`` does; the Serve
    client whose ``deploy_apps`` takes a ``ServeDeploySchema`` (no public Python API deploys a
    config that Serve can then reconfigure in place)."""
    from ray.serve._private.api import serve_start

    return serve_start(http_options=http_options, proxy_location=proxy_location)


def checked_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """A cluster-launcher YAML with the provider's defaults filled in, validated by Ray's own
    schema (what ``ray up`` checks first); Ray's exceptions pass through."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(dict(config))
    validate_config(prepared)
    return prepared


def auth_token() -> str | None:
    """The user's Ray authentication token (``RAY_AUTH_TOKEN`` or its file), if any."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    if not loader.has_token(ignore_auth_mode=True):
        return None
    return loader.get_raw_token(ignore_auth_mode=True)


def serve_submission_client() -> type:
    """The dashboard's Serve REST client class (``serve deploy`` / ``serve status`` use it)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient


def serve_replica(app_name: str, deployment: str, replica_id: str) -> Any:
    """The actor of one Serve replica (the id ``serve.get_replica_context()`` gives it), found by
    the name Serve registers it under; the tests kill one to see it replaced."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE

    return ray.get_actor(serve_replica_name(app_name, deployment, replica_id), namespace=SERVE_NAMESPACE)


def serve_replica_name(app_name: str, deployment: str, replica_id: str) -> str:
    """The actor name Serve gives a replica (``SERVE_REPLICA::app#deployment#id`` in Ray 2.60)."""
    from ray.serve._private.common import DeploymentID, ReplicaID

    return ReplicaID(replica_id, DeploymentID(name=deployment, app_name=app_name)).to_full_id_str()


def ongoing_requests(replica: Any) -> int:
    """How many requests a replica actor holds now (Serve's own queue-length probe, answered
    beside the user's code, so a replica busy scoring still answers)."""
    import ray

    return ray.get(replica.get_num_ongoing_requests.remote())
