"""Each of Ray's non-public pieces oi-ray uses (oi_ray/ray_internals.py), checked against the
installed Ray: on a Ray that moved or changed one, the failure is here, naming it."""

import importlib.util
import inspect
import ipaddress
import os
import subprocess
import sys
import traceback
from pathlib import Path

import ray
import ray.exceptions

from oi_ray import ray_internals


def test_joining_an_address_keeps_its_port_and_names_an_ip():
    host, port = ray_internals.bootstrap_address("127.0.0.1:6379").rsplit(":", 1)
    assert port == "6379"
    ipaddress.ip_address(host)  # Ray puts the node's own address for loopback


def test_ray_init_takes_the_metrics_port_argument():
    """ray.init takes it among its private **kwargs, which it unpacks by name."""
    source = inspect.getsource(inspect.unwrap(ray.init))
    assert f'"{ray_internals.METRICS_EXPORT_PORT_ARGUMENT}"' in source.replace("'", '"')
    assert ray_internals.metrics_export_port(9100) == {ray_internals.METRICS_EXPORT_PORT_ARGUMENT: 9100}


def test_serve_start_takes_http_options_and_proxy_location():
    from ray.serve._private.api import serve_start

    assert {"http_options", "proxy_location"} <= set(inspect.signature(serve_start).parameters)


def test_the_cluster_launchers_checks_fill_defaults_and_refuse_unknown_keys():
    config = {"cluster_name": "c", "provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
              "auth": {"ssh_user": "u"}}
    prepared = ray_internals.checked_cluster_config(config)
    assert {"available_node_types", "head_node_type", "file_mounts"} <= set(prepared)
    try:
        ray_internals.checked_cluster_config({**config, "head_start_ray_command": ["ray start --head"]})
    except Exception as error:  # jsonschema's ValidationError
        assert "'head_start_ray_command' was unexpected" in str(error)
    else:
        raise AssertionError("a misspelt key passed Ray's cluster schema")


def test_the_users_token_is_read_from_ray_auth_token():
    """In a fresh process: Ray's token loader is a process-wide singleton."""
    script = "from oi_ray.ray_internals import auth_token; print(auth_token())"
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")}
    with_token = subprocess.run([sys.executable, "-c", script], env={**environment, "RAY_AUTH_TOKEN": "t0ken"},
                                capture_output=True, text=True, check=True, timeout=120)
    assert with_token.stdout.strip() == "t0ken"


def test_rays_job_server_still_says_no_agent_and_its_sdk_logger_exists():
    dashboard = Path(ray.__file__).parent / "dashboard"
    sources = (path.read_text(errors="replace") for path in dashboard.rglob("*.py"))
    assert any(ray_internals.NO_JOB_AGENT_MESSAGE in text for text in sources), \
        "Ray's job server no longer has the message oi-ray waits out after a head starts"
    assert importlib.util.find_spec(ray_internals.JOB_SDK_LOGGER) is not None


def test_the_dashboards_serve_client_reads_and_deploys_applications():
    client = ray_internals.serve_submission_client()
    assert callable(client.get_serve_details) and callable(client.deploy_applications)


def test_a_ray_task_error_ends_with_the_users_exception_line():
    try:
        raise ValueError("train.csv row 3: no golden_path")
    except ValueError as cause:
        error = ray.exceptions.RayTaskError("score_batch", traceback.format_exc(), cause)
    assert "Traceback" in str(error) or "File " in str(error)  # Ray prints the traceback first
    assert ray_internals.exception_line(str(error)) == "ValueError: train.csv row 3: no golden_path"
    assert ray_internals.exception_line(str(error.as_instanceof_cause())) == \
        "ValueError: train.csv row 3: no golden_path"
    assert ray_internals.exception_line(" \n\n") is None


def test_serve_replicas_are_named_actors_that_report_their_queue():
    """On a real replica: tests/test_serve.py kills one and waits for a request to reach one."""
    from ray.serve._private.replica import ReplicaActor

    assert callable(ReplicaActor.get_num_ongoing_requests)
    name = ray_internals.serve_replica_name("fragile", "InspectionService", "r1x")
    assert name.endswith("fragile#InspectionService#r1x") and name != "fragile#InspectionService#r1x"
