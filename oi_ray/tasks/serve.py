"""``oi-ray serve``: score pairs over HTTP on Ray Serve until Ctrl-C (or write its Serve config).

The model, token and port are checked before Ray starts. The application is deployed from
the same Serve config that ``--build`` writes, so what runs here is what ``serve deploy`` or a
KubeRay ``RayService`` runs from that file.
"""

import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve

from oi_ray.config.schema import ExperimentConfig, ServeConfig
from oi_ray.decision import choose_threshold
from oi_ray.errors import ConfigError
from oi_ray.fileio import write_atomically
from oi_ray.model_file import ModelFile
from oi_ray.runtime import ray_session
from oi_ray.serving.app import deploy, serve_config
from oi_ray.serving.model import resolve_served_model
from oi_ray.serving.uploads import UploadLayout

log = logging.getLogger(__name__)
STATUS_EVERY_S = 5.0
BUILD_HEADER = """\
# Ray Serve config for oi-ray's inspection service, written by `oi-ray serve --build`.
# Deploy it to a running Ray cluster that has oi-ray installed:
#   serve deploy {path} -a http://<head>:8265
# or use it as `serveConfigV2` of a KubeRay RayService. The model file must be readable on the
# cluster's nodes at the path under args.spec.serve.model.
# The deployment options below win over args.spec.serve; changing only
# user_config.threshold and redeploying applies the new threshold without restarting replicas.
"""


def run(config: ExperimentConfig, build: Path | None = None) -> None:
    """Serve ``serve.model`` until Ctrl-C; with ``build``, write the Serve config there instead."""
    model = resolve_served_model(config)
    deploy_config = serve_config(config)
    if build is not None:
        _write_build(deploy_config, build)
        return
    settings = config.serve
    _check_token(settings)
    if config.ray.address is None:
        _check_port_free(settings)
    with ray_session(config.ray):
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        _check_capacity(settings)
        log.info("starting Ray Serve and %d replica(s) of %s", _first_replicas(settings), model.name)
        deploy(deploy_config)
        print(_banner(config, model), flush=True)
        try:
            _wait_for_stop(settings.app_name)
        finally:
            log.info("stopping: draining and deleting the application %r", settings.app_name)
            serve.delete(settings.app_name)  # only this application: others on a shared cluster keep running
    log.info("stopped")


def _write_build(deploy_config: dict[str, Any], path: Path) -> None:
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = BUILD_HEADER.format(path=path.name) + yaml.safe_dump(deploy_config, sort_keys=False)
    write_atomically(path, text.encode())
    log.info("wrote %s; deploy it with: serve deploy %s -a http://<head>:8265", path, path.name)


def _check_token(settings: ServeConfig) -> None:
    variable = settings.auth_token_env
    if variable and not os.environ.get(variable, "").strip():
        raise ConfigError(f"serve.auth_token_env={variable!r}: the environment variable {variable} is not "
                          f"set; export {variable}=<token> before starting the service")


def _check_port_free(settings: ServeConfig) -> None:
    with socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET) as probe:
        try:
            probe.bind((settings.host, settings.port))
        except OSError as error:
            raise ConfigError(f"serve.port={settings.port}: cannot listen on {settings.host}:{settings.port} "
                              f"({error.strerror}); choose another port with serve.port") from None


def _first_replicas(settings: ServeConfig) -> int:
    scaling = settings.autoscaling_config
    return scaling.initial_replicas if scaling.initial_replicas is not None else max(1, scaling.min_replicas)


def _check_capacity(settings: ServeConfig) -> None:
    """Refuse a service whose first replicas can never be placed on this Ray cluster."""
    resources = ray.cluster_resources()
    replicas = _first_replicas(settings)
    for name, per_replica in (("CPU", settings.num_cpus), ("GPU", settings.num_gpus)):
        if per_replica * replicas > resources.get(name, 0):
            key = "num_cpus" if name == "CPU" else "num_gpus"
            available = resources.get(name, 0)
            raise ConfigError(f"serve.{key}={per_replica} x {replicas} replica(s) needs "
                              f"{per_replica * replicas:g} {name}s; the Ray cluster has {available:g}")


def _banner(config: ExperimentConfig, model: ModelFile) -> str:
    settings = config.serve
    host = socket.gethostname() if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"http://{host}:{settings.port}{settings.route_prefix.rstrip('/')}"
    threshold = choose_threshold(settings.threshold, "serve.threshold", model.carried, model.card.margin)
    scaling = settings.autoscaling_config
    layout = UploadLayout(model.card.lights, settings.max_pairs_per_request)
    device = f"{settings.num_gpus:g} GPU" if settings.num_gpus > 0 else f"{settings.num_cpus:g} CPU"
    example = " ".join(f"-F {field}=@{field.replace('.', '_')}.jpg" for field in
                       layout.expected_fields().split(", "))
    metrics = _metrics_port()
    lines = [
        f"oi-ray serve: {model.name} ({model.backend}, {device} per replica, "
        f"{scaling.min_replicas}..{scaling.max_replicas} replicas) at {base}/",
        f"  POST {base}/v1/inspect   one image per field: {layout.expected_fields()}",
        f"  GET  {base}/v1/model     GET {base}/healthz",
        f"  decision threshold {threshold.value:.4g}: {threshold.source}",
        f"  try: curl {example} {base}/v1/inspect",
    ]
    if settings.golden_store:
        lines.append(f"  PUT  {base}/v1/goldens/<part>   golden library in {settings.golden_store}; "
                     "then send golden_id=<part> with the test images alone")
    if settings.auth_token_env:
        lines.append(f"  requests need: -H \"Authorization: Bearer ${settings.auth_token_env}\"")
    if metrics:
        lines.append(f"  Prometheus metrics (oi_ray_*, ray_serve_*): http://127.0.0.1:{metrics}/metrics")
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)


def _metrics_port() -> int | None:
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    return nodes[0].get("MetricsExportPort") if len(nodes) == 1 else None


def _wait_for_stop(app_name: str) -> None:
    """Block until Ctrl-C or SIGTERM; log when the application's status changes."""
    # `kill` and `kill -INT` stop as cleanly as Ctrl-C, also from a script: a non-interactive
    # shell starts its background jobs with SIGINT ignored, and Python then leaves it ignored
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.default_int_handler)
    last = "RUNNING"
    try:
        while True:
            time.sleep(STATUS_EVERY_S)
            status = serve.status().applications.get(app_name)
            state = status.status.value if status else "DELETED"
            if state != last:
                reason = f": {status.message}" if status and status.message else ""
                log.warning("the service is %s%s", state, reason)
                last = state
    except KeyboardInterrupt:
        return
