"""``oi-ray serve --address`` / ``--cluster``: deploy the inspection service to a running
cluster through Ray Serve's REST API on its head, as ``serve deploy`` does.

The Serve config is the one ``--build`` writes. Serve's REST API takes the whole set of
applications, so the cluster's other applications are sent back unchanged beside this one.
The service keeps running on the cluster after the command returns.
"""

import logging
import time
from typing import Any
from urllib.parse import urlparse

from oi_ray.config.schema import ExperimentConfig
from oi_ray.errors import OiRayError
from oi_ray.launch.jobs import dashboard_client
from oi_ray.ray_internals import serve_submission_client
from oi_ray.serving.app import serve_config

log = logging.getLogger(__name__)
DEPLOY_TIMEOUT_S = 600.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServeDeployFailedError(OiRayError):
    """The cluster could not start the application."""


def deploy_to_cluster(config: ExperimentConfig, address: str) -> None:
    """Deploy ``config``'s service to the cluster whose dashboard is ``address``; wait until it runs."""
    settings = config.serve
    if settings.host in LOOPBACK_HOSTS:
        log.warning("serve.host=%s: the cluster's HTTP proxies will only answer on their own machines; "
                    "set serve.host=0.0.0.0 to reach the service from the network", settings.host)
    if settings.auth_token_env:
        log.info("serve.auth_token_env=%s: the variable must be set on the cluster's nodes",
                 settings.auth_token_env)
    client = dashboard_client(serve_submission_client(), address, "dashboard")
    ours = serve_config(config)
    name = settings.app_name
    others = [app["deployed_app_config"] for app_name, app in _applications(client).items()
              if app_name != name and app.get("deployed_app_config")]
    client.deploy_applications({**ours, "applications": [*others, *ours["applications"]]})
    log.info("deploying application %r to %s (%d other application(s) kept)", name, address, len(others))
    _wait_until_running(client, name)
    host = urlparse(address).hostname if settings.host not in LOOPBACK_HOSTS else settings.host
    base = f"http://{host}:{settings.port}{settings.route_prefix.rstrip('/')}"
    print(f"oi-ray serve: application {name!r} runs on the cluster at {base}/\n"
          f"  POST {base}/v1/inspect   GET {base}/v1/model   GET {base}/healthz\n"
          f"  it keeps running; redeploy to change it (a new serve.threshold is applied in place)",
          flush=True)


def _applications(client: Any) -> dict[str, Any]:
    return client.get_serve_details().get("applications") or {}


def _wait_until_running(client: Any, name: str) -> None:
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while True:
        application = _applications(client).get(name, {})
        status = application.get("status", "NOT_STARTED")
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ServeDeployFailedError(f"application {name!r} is {status} on the cluster: "
                                         f"{application.get('message', '')}")
        if time.monotonic() > deadline:
            raise ServeDeployFailedError(f"application {name!r} did not start within {DEPLOY_TIMEOUT_S:g} s "
                                         f"(status {status})")
        time.sleep(1)
