"""The Serve application: its importable builder, its Serve config, and deploying that config.

``oi-ray serve`` and ``serve deploy`` / a KubeRay ``RayService`` take the same path: a Ray
Serve config (what :func:`serve_config` returns, what ``oi-ray serve --build`` writes) names
:func:`build_app` by import path and passes it the spec as arguments; the controller builds
the application from them and starts the replicas. Because the application is deployed from
a config, Serve versions it by its import path and arguments, so a redeploy that changes only
``user_config`` (the threshold) reconfigures the running replicas instead of replacing them.
"""

import time
from dataclasses import asdict
from typing import Any

from omegaconf import OmegaConf
from ray import serve
from ray.serve import Application

from oi_ray.config import config_from_mapping
from oi_ray.config.schema import ExperimentConfig, ServeConfig
from oi_ray.errors import OiRayError
from oi_ray.ray_internals import exception_line, start_serve
from oi_ray.serving.model import resolve_served_model, served_model_path
from oi_ray.serving.service import DEPLOYMENT_NAME, THRESHOLD_KEY, InspectionService, ServiceSettings

IMPORT_PATH = "oi_ray.serving.app:build_app"
DEPLOY_TIMEOUT_S = 300.0  # building the app and starting replicas that load a model
POLL_S = 0.5


class ServeDeployError(OiRayError):
    """Ray Serve could not deploy or run the application."""


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder: ``args = {"spec": <an oi-ray spec as a mapping>}``.

    The spec is validated as a spec file is; the model is checked before any replica starts."""
    config = config_from_mapping(args.get("spec"), "the Serve application's args.spec")
    model = resolve_served_model(config)
    deployment = InspectionService.options(**deployment_options(config.serve))
    return deployment.bind(model, service_settings(config.serve))


def service_settings(serve_config: ServeConfig) -> ServiceSettings:
    """What each replica needs from the ``serve`` section."""
    return ServiceSettings(
        max_pairs_per_request=serve_config.max_pairs_per_request,
        max_request_bytes=int(serve_config.max_request_mb * 2**20),
        max_batch_size=serve_config.batching.max_batch_size,
        batch_wait_timeout_s=serve_config.batching.batch_wait_timeout_s,
        resize_images=serve_config.resize_images,
        use_gpu=serve_config.num_gpus > 0,
        threads=max(1, int(serve_config.num_cpus)),
        auth_token_env=serve_config.auth_token_env,
        golden_store=serve_config.golden_store,
        golden_cache_bytes=int(serve_config.golden_cache_mb * 2**20),
    )


def deployment_options(serve_config: ServeConfig) -> dict[str, Any]:
    """The deployment's Serve options: autoscaling, queue limits, resources and ``user_config``."""
    scaling = {name: value for name, value in asdict(serve_config.autoscaling_config).items()
               if value is not None}
    return {
        "autoscaling_config": scaling,
        "max_ongoing_requests": serve_config.max_ongoing_requests,
        "max_queued_requests": serve_config.max_queued_requests,
        "ray_actor_options": {"num_cpus": serve_config.num_cpus, "num_gpus": serve_config.num_gpus},
        "user_config": {THRESHOLD_KEY: serve_config.threshold},
    }


def serve_config(config: ExperimentConfig) -> dict[str, Any]:
    """The Ray Serve config (``ServeDeploySchema``) that deploys this spec's service.

    ``args.spec`` holds the resolved sections the service reads (the model's path made
    absolute, the threshold left to ``user_config``); ``deployments`` repeats the deployment
    options so they can be edited in place: there they win over ``args``, and a change of
    ``user_config.threshold`` alone is applied to running replicas."""
    settings = config.serve
    resolved = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    model_path = served_model_path(config)
    # The threshold travels only in user_config: arguments that differ make Serve replace the
    # replicas, a user_config that differs is applied to the running ones.
    spec: dict[str, Any] = {"model": resolved["model"],
                            "serve": {**resolved["serve"], "model": model_path, "threshold": None}}
    if model_path.endswith(".pth"):  # a checkpoint has no model card: the dataset section is its layout
        spec["dataset"] = resolved["dataset"]
    if config.encryption_key is not None:
        spec["encryption_key"] = config.encryption_key
    return {
        "proxy_location": settings.proxy_location,
        "http_options": {"host": settings.host, "port": settings.port,
                         "request_timeout_s": settings.request_timeout_s},
        "applications": [{
            "name": settings.app_name,
            "route_prefix": settings.route_prefix,
            "import_path": IMPORT_PATH,
            "args": {"spec": spec},
            "deployments": [{"name": DEPLOYMENT_NAME, **deployment_options(settings)}],
        }],
    }


def deploy(config_dict: dict[str, Any], timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Start Serve on the connected Ray (HTTP options from the config) and deploy the config's
    applications, as ``serve run config.yaml`` does; return once they run, or raise with
    Serve's reason."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config_dict)
    client = start_serve(schema.http_options.model_dump(), schema.proxy_location)
    client.deploy_apps(schema)
    for application in schema.applications:
        wait_until_running(application.name, timeout_s)


def wait_until_running(app_name: str, timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Block until ``app_name`` runs; raise with Serve's reason when it fails or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(app_name)
        state = status.status.value if status else "NOT_STARTED"
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ServeDeployError(f"Ray Serve could not start {app_name!r} ({state}): {_reason(status)}")
        if time.monotonic() > deadline:
            reason = _reason(status) if status else "no status"
            raise ServeDeployError(f"{app_name!r} did not start within {timeout_s:.0f} s "
                                   f"(status {state}): {reason}")
        time.sleep(POLL_S)


def _reason(status: Any) -> str:
    """The useful line of a Serve application status: the last line of the first failing
    deployment's message (its exception), else the application's own message."""
    messages = [deployment.message for deployment in status.deployments.values() if deployment.message]
    for message in [*messages, status.message]:
        line = exception_line(message)
        if line:
            return line.removeprefix("oi_ray.errors.")
    return "no reason given"
