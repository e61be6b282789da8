"""``oi-ray serve``: real HTTP requests to a real Ray Serve application on 127.0.0.1.

One model is trained, exported and scored offline with ``oi-ray inference``; the service must
give the same distances. Every request goes to 127.0.0.1, in bounded numbers, with timeouts.
"""

import base64
import concurrent.futures
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import ray
import requests
import torch
import yaml
from helpers import free_port, kill_group
from ray import serve
from ray.serve.schema import ServeDeploySchema

from oi_ray import ray_internals
from oi_ray.cli import main
from oi_ray.config import load_config
from oi_ray.config.schema import CalibrationRuleConfig
from oi_ray.data.pairs import PairTable, load_split
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.metrics import describe_rule
from oi_ray.serving.app import IMPORT_PATH, build_app, deploy, serve_config
from oi_ray.serving.service import DEPLOYMENT_NAME

pytestmark = pytest.mark.ray
LIGHTS = ("WhiteLight", "SolderLight")
TOKEN_ENV = "OI_RAY_TEST_SERVE_TOKEN"
TOKEN = "loopback-test-token"
HTTP_TIMEOUT_S = 30
MAX_PAIRS = 8

DEFAULT_RULE = describe_rule(CalibrationRuleConfig())  # train.calibration by default, in words


@pytest.fixture(scope="module", autouse=True)
def token_in_environment():
    """The token must be in the environment before Ray starts: replicas inherit it from there."""
    os.environ[TOKEN_ENV] = TOKEN
    yield
    os.environ.pop(TOKEN_ENV, None)


@dataclass(frozen=True)
class Exported:
    spec: Path
    results: Path
    onnx: Path
    table: PairTable  # the test split, scored offline
    offline: pd.DataFrame  # inference.csv


@pytest.fixture(scope="module")
def exported(ray_local, tmp_path_factory) -> Exported:
    root = tmp_path_factory.mktemp("serve")
    spec = synthesize_dataset(root / "data", SyntheticSpec(num_pairs=120, lights=LIGHTS, width=16, height=16,
                                                           image_ext=".png", seed=7)).spec_path
    results = root / "results"
    common = ["-e", str(spec), f"results_dir={results}"]
    assert main(["train", *common, "train.num_epochs=1", "dataset.batch_size=8", "ray.num_workers=1"]) == 0
    assert main(["export", *common]) == 0
    onnx = results / "export" / "oi_model.onnx"
    assert main(["inference", *common, f"inference.checkpoint={onnx}", "inference.batch_size=8"]) == 0
    config = load_config(spec, [f"results_dir={results}"])
    return Exported(spec, results, onnx, load_split(config.dataset, "test_dataset"),
                    pd.read_csv(results / "inference" / "inference.csv"))


@dataclass
class Service:
    exported: Exported
    port: int
    overrides: list[str]

    def url(self, path: str, prefix: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{prefix}{path}"

    def config(self, *extra: str):
        return load_config(self.exported.spec, [*self.overrides, *extra])


@pytest.fixture(scope="module")
def service(exported) -> Service:
    port = free_port()
    overrides = [f"results_dir={exported.results}", f"serve.port={port}", f"serve.max_pairs_per_request={MAX_PAIRS}",
                 "serve.max_request_mb=0.05", "serve.batching.batch_wait_timeout_s=0.05"]
    running = Service(exported, port, overrides)
    deploy(serve_config(running.config()))
    yield running
    serve.shutdown()


def _files(table: PairTable, row: int, prefix: str = "") -> list[tuple[str, tuple[str, bytes]]]:
    files = []
    for side, paths in (("test", table.test_paths[row]), ("golden", table.golden_paths[row])):
        for light, path in zip(LIGHTS, paths, strict=True):
            files.append((f"{prefix}{side}.{light}", (Path(path).name, Path(path).read_bytes())))
    return files


def _json_pair(table: PairTable, row: int) -> dict:
    return {"id": f"row{row}", **{side: {light: base64.b64encode(Path(path).read_bytes()).decode()
                                         for light, path in zip(LIGHTS, paths, strict=True)}
                                  for side, paths in (("test", table.test_paths[row]),
                                                      ("golden", table.golden_paths[row]))}}


def _inspect_row(service: Service, row: int, prefix: str = "", **kwargs) -> requests.Response:
    return requests.post(service.url("/v1/inspect", prefix), files=_files(service.exported.table, row),
                         data={"id": f"row{row}"}, timeout=HTTP_TIMEOUT_S, **kwargs)


def test_http_scores_equal_offline_inference(service):
    table, offline = service.exported.table, service.exported.offline
    answers = []
    for row in range(3):  # multipart, one pair per request
        response = _inspect_row(service, row)
        assert response.status_code == 200, response.text
        answers += response.json()["results"]
    rows = list(range(3, len(table)))
    for start in range(0, len(rows), MAX_PAIRS):  # JSON, several pairs per request
        chunk = rows[start:start + MAX_PAIRS]
        response = requests.post(service.url("/v1/inspect"), json={"pairs": [_json_pair(table, row) for row in chunk]},
                                 timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 200, response.text
        answers += response.json()["results"]
    assert [answer["id"] for answer in answers] == [f"row{row}" for row in range(len(table))]
    np.testing.assert_allclose([answer["distance"] for answer in answers], offline["siamese_score"], atol=1e-5, rtol=0)
    assert [answer["decision"] for answer in answers] == list(offline["decision"])
    card = requests.get(service.url("/v1/model"), timeout=HTTP_TIMEOUT_S).json()
    assert {answer["threshold"] for answer in answers} == {card["threshold"]["value"]}
    assert card["card"]["lights"] == list(LIGHTS) and card["backend"] == "onnxruntime"
    assert answers[0]["model"] == card["model"] and card["model"].startswith("oi_model.onnx@")


def test_concurrent_requests_are_batched_and_counted(service):
    requests_sent = 16
    with ThreadPoolExecutor(requests_sent) as pool:
        statuses = list(pool.map(lambda row: _inspect_row(service, row % 8).status_code, range(requests_sent)))
    assert statuses == [200] * requests_sent
    metrics = _poll_metrics(lambda text: _sum(text, "ray_oi_ray_batch_pairs_count") > _sum(
        text, "ray_oi_ray_batch_pairs_bucket", 'le="1.0"'))
    assert _sum(metrics, "ray_oi_ray_pairs_scored_total") >= requests_sent
    assert "ray_oi_ray_pair_distance_bucket" in metrics
    flagged_offline = int((service.exported.offline["decision"][:8] == "NO_PASS").sum())
    assert flagged_offline > 0, "the test split should hold NO_PASS pairs among its first rows"
    assert _sum(metrics, "ray_oi_ray_no_pass_decisions_total") >= flagged_offline


def _sum(metrics: str, name: str, label: str = "") -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(name + "{") and label in line)


def _poll_metrics(ready, timeout_s: float = 60) -> str:
    """Ray's Prometheus endpoint on this node, once ``ready(text)`` holds (exports lag seconds)."""
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline = time.monotonic() + timeout_s
    while True:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=HTTP_TIMEOUT_S).text
        if ready(text):
            return text
        assert time.monotonic() < deadline, "metrics did not show up in time"
        time.sleep(2)


def _bad_requests(table: PairTable) -> dict[str, tuple[dict, int, str]]:
    good = _files(table, 0)
    png = good[0][1][1]
    return {
        "missing lighting": ({"files": good[:-1]}, 422, "missing_image"),
        "extra lighting": ({"files": [*good, ("test.UVLight", ("x.png", png))]}, 422, "unknown_lighting"),
        "undecodable image": ({"files": [*good[:-1], (good[-1][0], ("x.png", b"not an image"))]}, 422,
                              "undecodable_image"),
        "truncated image": ({"files": [(good[0][0], ("x.png", png[:-20])), *good[1:]]}, 422, "undecodable_image"),
        "too many pairs": ({"json": [_json_pair(table, 0)] * (MAX_PAIRS + 1)}, 413, "too_many_pairs"),
        "oversized body": ({"data": b"x" * 60_000, "headers": {"content-type": "application/json"}}, 413,
                           "body_too_large"),
        "malformed JSON": ({"data": b'{"pairs": [', "headers": {"content-type": "application/json"}}, 400,
                           "malformed_json"),
        "deeply nested JSON": ({"data": b"[" * 20_000 + b"]" * 20_000,
                                "headers": {"content-type": "application/json"}}, 400, "malformed_json"),
        "wrong content type": ({"data": b"hello", "headers": {"content-type": "text/plain"}}, 415,
                               "unsupported_media_type"),
    }


@pytest.mark.parametrize("case", ["missing lighting", "extra lighting", "undecodable image", "truncated image",
                                  "too many pairs", "oversized body", "malformed JSON", "deeply nested JSON",
                                  "wrong content type"])
def test_bad_requests_get_a_json_4xx_and_the_service_keeps_answering(service, case):
    kwargs, status, code = _bad_requests(service.exported.table)[case]
    response = requests.post(service.url("/v1/inspect"), timeout=HTTP_TIMEOUT_S, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if code in ("missing_image", "unknown_lighting", "undecodable_image"):
        assert error["pair"] == 0 and error["lighting"] in (*LIGHTS, "UVLight")
    assert _inspect_row(service, 1).status_code == 200


def test_every_oversized_body_gets_its_413_not_a_reset(service):
    """A client still sending when the refusal is ready: the service reads the rest and answers,
    so the client sees the JSON error (answering at once reset some of these connections)."""
    body = b"x" * (2 * 2**20)  # 40x serve.max_request_mb
    for declared in (True, False) * 10:
        data = body if declared else iter([body[:2**20], body[2**20:]])  # chunked: no content-length
        response = requests.post(service.url("/v1/inspect"), data=data, timeout=HTTP_TIMEOUT_S,
                                 headers={"content-type": "application/json"})
        assert (response.status_code, response.json()["error"]["code"]) == (413, "body_too_large")


def test_request_errors_are_counted_by_code(service):
    requests.post(service.url("/v1/inspect"), data=b"{", headers={"content-type": "application/json"},
                  timeout=HTTP_TIMEOUT_S)
    metrics = _poll_metrics(lambda text: _sum(text, "ray_oi_ray_request_errors_total", 'code="malformed_json"') >= 1)
    assert _sum(metrics, "ray_oi_ray_request_errors_total", 'code="malformed_json"') >= 1


def test_threshold_redeploy_reconfigures_running_replica(service):
    before = requests.get(service.url("/healthz"), timeout=HTTP_TIMEOUT_S).json()
    assert before["status"] == "ok"
    deploy(serve_config(service.config("serve.threshold=123.5")))
    assert _wait_for_threshold(service, 123.5)["source"] == "serve.threshold (user_config)"
    after = requests.get(service.url("/healthz"), timeout=HTTP_TIMEOUT_S).json()
    assert after["replica"] == before["replica"]  # the same replica, reconfigured
    answer = _inspect_row(service, 0).json()["results"][0]
    assert answer["threshold"] == 123.5 and answer["decision"] == "PASS"
    deploy(serve_config(service.config()))
    assert _wait_for_threshold(service, None)["source"].startswith("calibrated on the validation set")


def _wait_for_threshold(service: Service, value: float | None, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        threshold = requests.get(service.url("/v1/model"), timeout=HTTP_TIMEOUT_S).json()["threshold"]
        if (value is None and "user_config" not in threshold["source"]) or threshold["value"] == value:
            return threshold
        assert time.monotonic() < deadline, f"threshold still {threshold}"
        time.sleep(0.5)


def test_bearer_token_is_required_when_configured(service):
    app = service.config(f"serve.auth_token_env={TOKEN_ENV}", "serve.app_name=secured",
                         "serve.route_prefix=/secured")
    deploy(serve_config(app))
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = _inspect_row(service, 0, "/secured", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
        assert requests.get(service.url("/v1/model", "/secured"), timeout=HTTP_TIMEOUT_S).status_code == 401
        assert requests.get(service.url("/healthz", "/secured"), timeout=HTTP_TIMEOUT_S).status_code == 200
        response = _inspect_row(service, 0, "/secured", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200 and response.json()["results"][0]["id"] == "row0"
    finally:
        serve.delete("secured")


@dataclass
class HeldRequest:
    """A request sent from a thread that the app's replica holds (waiting out the batch window)."""

    replica_id: str
    replica: Any  # the replica's actor
    thread: threading.Thread
    status: list[int]  # its status code, once answered


def _hold_one_request(service: Service, app_name: str, prefix: str) -> HeldRequest:
    """Send one request and return once the app's (only) replica holds it."""
    replica_id = requests.get(service.url("/healthz", prefix), timeout=HTTP_TIMEOUT_S).json()["replica"]
    replica = ray_internals.serve_replica(app_name, DEPLOYMENT_NAME, replica_id)
    deadline = time.monotonic() + HTTP_TIMEOUT_S
    while ray_internals.ongoing_requests(replica) != 0:  # the health check has left
        assert time.monotonic() < deadline, "the replica never went idle"
        time.sleep(0.05)
    status: list[int] = []
    request = threading.Thread(target=lambda: status.append(_inspect_row(service, 0, prefix).status_code))
    request.start()
    while ray_internals.ongoing_requests(replica) != 1:
        assert request.is_alive() and time.monotonic() < deadline, \
            f"the request never reached the replica: {status}"
        time.sleep(0.05)
    return HeldRequest(replica_id, replica, request, status)


def test_overload_is_refused_with_503_not_queued(service):
    """One request held by the replica (max_ongoing_requests=1) and one queued for it
    (max_queued_requests=1): every further request is refused at once, and the two are answered."""
    app = service.config("serve.app_name=narrow", "serve.route_prefix=/narrow", "serve.max_ongoing_requests=1",
                         "serve.max_queued_requests=1", "serve.batching.batch_wait_timeout_s=5.0")
    deploy(serve_config(app))
    try:
        held = _hold_one_request(service, "narrow", "/narrow")
        with ThreadPoolExecutor(5) as pool:
            statuses = list(pool.map(lambda _: _inspect_row(service, 0, "/narrow").status_code, range(5)))
        held.thread.join(HTTP_TIMEOUT_S)
        assert held.status == [200] and sorted(statuses) == [200, 503, 503, 503, 503]
    finally:
        serve.delete("narrow")


def _wait_for_a_replacement(service: Service, prefix: str, killed: str) -> None:
    """Until a replica other than ``killed`` answers the health check (Serve replaces it)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            health = requests.get(service.url("/healthz", prefix), timeout=HTTP_TIMEOUT_S)
            if health.status_code == 200 and health.json()["replica"] != killed:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "no replacement replica"
        time.sleep(1)


def test_a_killed_replica_is_replaced_and_nothing_hangs(service):
    app = service.config("serve.app_name=fragile", "serve.route_prefix=/fragile",
                         "serve.batching.batch_wait_timeout_s=10.0")
    deploy(serve_config(app))
    try:
        held = _hold_one_request(service, "fragile", "/fragile")
        ray.kill(held.replica, no_restart=True)
        held.thread.join(HTTP_TIMEOUT_S + 5)
        # failed with its replica (had it waited out its 10 s batch window, it would be a 200)
        assert not held.thread.is_alive() and held.status == [500]
        _wait_for_a_replacement(service, "/fragile", held.replica_id)
        assert _inspect_row(service, 0, "/fragile").status_code == 200
    finally:
        serve.delete("fragile")


def test_build_writes_a_serve_config_that_deploys(service, tmp_path):
    target = tmp_path / "serve_config.yaml"
    assert main(["serve", "-e", str(service.exported.spec), *service.overrides, "serve.app_name=built",
                 "serve.route_prefix=/built", "serve.threshold=0.5", "--build", str(target)]) == 0
    text = target.read_text()
    assert text.startswith("# Ray Serve config for oi-ray") and "serve deploy serve_config.yaml" in text
    document = yaml.safe_load(text)
    schema = ServeDeploySchema.model_validate(document)  # Ray's own schema
    application = schema.applications[0]
    assert application.import_path == IMPORT_PATH and application.route_prefix == "/built"
    assert document["applications"][0]["deployments"][0]["user_config"] == {"threshold": 0.5}
    assert application.args["spec"]["serve"]["model"] == str(service.exported.onnx)
    assert type(build_app(application.args)).__name__ == "Application"  # what the Serve controller calls
    deploy(document)
    try:
        answer = _inspect_row(service, 0, "/built").json()["results"][0]
        assert answer["threshold"] == 0.5
        assert answer["distance"] == pytest.approx(service.exported.offline["siamese_score"][0], abs=1e-5)
    finally:
        serve.delete("built")


SERVE_DEPLOY = """
import json, subprocess, sys, time, urllib.request
import ray
ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
         dashboard_port={dashboard}, log_to_driver=False)
try:
    done = subprocess.run([{serve!r}, "deploy", {config!r}, "-a", "http://127.0.0.1:{dashboard}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 180
    while True:
        try:
            print(urllib.request.urlopen("http://127.0.0.1:{port}/v1/model", timeout=10).read().decode())
            break
        except OSError:
            assert time.monotonic() < deadline, "the deployed service never answered"
            time.sleep(2)
finally:
    ray.shutdown()
"""


def test_build_file_deploys_with_rays_serve_deploy(service, tmp_path):
    """`serve deploy` (Ray's CLI, through the dashboard's REST API) on a second, private Ray."""
    port, dashboard = free_port(), free_port()
    target = tmp_path / "serve_config.yaml"
    assert main(["serve", "-e", str(service.exported.spec), f"results_dir={service.exported.results}",
                 f"serve.port={port}", "serve.threshold=0.25", "--build", str(target)]) == 0
    script = SERVE_DEPLOY.format(dashboard=dashboard, port=port, config=str(target),
                                 serve=str(Path(sys.executable).with_name("serve")))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=400,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads(done.stdout.strip().splitlines()[-1])
    assert card["threshold"] == {"value": 0.25, "source": "serve.threshold (user_config)"}
    assert card["file"] == str(service.exported.onnx)


def test_a_checkpoint_is_served_with_torch(service):
    checkpoint = service.exported.results / "train" / "oi_model_latest.pth"
    deploy(serve_config(service.config(f"serve.model={checkpoint}", "serve.app_name=torch",
                                       "serve.route_prefix=/torch")))
    try:
        card = requests.get(service.url("/v1/model", "/torch"), timeout=HTTP_TIMEOUT_S).json()
        assert card["backend"] == "torch" and card["card"]["opset_version"] is None
        # the link is resolved: the service keeps the file it loaded while training moves the link on
        assert card["file"] == str(checkpoint.resolve()) and card["model"].startswith("model_epoch_000.pth@")
        assert card["threshold"]["source"] == (f"calibrated on the validation set (by {DEFAULT_RULE}; "
                                               f"stored in the checkpoint {checkpoint.resolve()})")
        _assert_scores_like_onnx_offline(service, "/torch")
    finally:
        serve.delete("torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU; none is visible")
def test_gpu_replica_scores_like_the_cpu(service):
    deploy(serve_config(service.config("serve.num_gpus=1", "serve.app_name=gpu", "serve.route_prefix=/gpu")))
    try:
        _assert_scores_like_onnx_offline(service, "/gpu")
    finally:
        serve.delete("gpu")


def _assert_scores_like_onnx_offline(service: Service, prefix: str) -> None:
    """Another backend or device: the first pairs' distances within 1e-4 of ONNX Runtime's."""
    table = service.exported.table
    answers = requests.post(service.url("/v1/inspect", prefix), timeout=HTTP_TIMEOUT_S,
                            json=[_json_pair(table, row) for row in range(MAX_PAIRS)]).json()["results"]
    np.testing.assert_allclose([answer["distance"] for answer in answers],
                               service.exported.offline["siamese_score"][:MAX_PAIRS], atol=1e-4, rtol=0)


@pytest.mark.parametrize("overrides, message", [
    (["serve.model=/nowhere/model.onnx"], "model not found: /nowhere/model.onnx; export one with"),
    (["serve.auth_token_env=OI_RAY_TEST_UNSET_TOKEN"],
     "serve.auth_token_env='OI_RAY_TEST_UNSET_TOKEN': the environment variable OI_RAY_TEST_UNSET_TOKEN is not set"),
    (["serve.model={engine}"], "is a TensorRT engine, which runs on a GPU: set serve.num_gpus"),
    (["serve.port={busy}"], "cannot listen on 127.0.0.1:{busy}"),
    (["serve.model={older}", "serve.golden_store={tmp}"],
     "serve.golden_store: {older} was exported without its embed and compare halves (an older oi-ray)"),
])
def test_cli_refuses_before_starting(service, tmp_path, capsys, overrides, message):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")
    older = tmp_path / "older.onnx"  # an export of an oi-ray that wrote no halves
    older.write_bytes(service.exported.onnx.read_bytes())
    card = json.loads(Path(f"{service.exported.onnx}.json").read_text())
    Path(f"{older}.json").write_text(json.dumps({**card, "parts": {}}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        values = {"engine": engine, "busy": busy.getsockname()[1], "older": older, "tmp": tmp_path}
        code = main(["serve", "-e", str(service.exported.spec), f"results_dir={service.exported.results}",
                     *(override.format(**values) for override in overrides)])
    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith("oi-ray serve: error: ") and message.format(**values) in error, error


@pytest.mark.slow
def test_cli_serves_until_interrupted_beside_another_ray(service, tmp_path):
    """A real `oi-ray serve` process with its own embedded Ray (the test's Ray keeps running),
    from a spec that names only the model: its card holds everything else."""
    port = free_port()
    spec = tmp_path / "serve.yaml"
    spec.write_text(f"serve:\n  model: {service.exported.onnx}\n  port: {port}\nray:\n  num_cpus: 2\n")
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        # started as a script's background job is, with SIGINT ignored: `kill -INT` must still stop it
        process = subprocess.Popen([sys.executable, "-m", "oi_ray.cli", "serve", "-e", str(spec)],
                                   stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
                                   preexec_fn=functools.partial(signal.signal, signal.SIGINT, signal.SIG_IGN))
    try:
        banner = _read_until(process, "Press Ctrl-C to stop.", log, timeout_s=240)
        assert re.search(rf"oi_model\.onnx@\w+ \(onnxruntime, 1 CPU per replica, 1\.\.1 replicas\) at "
                         rf"http://127\.0\.0\.1:{port}/", banner), banner
        assert "test.WhiteLight, test.SolderLight, golden.WhiteLight, golden.SolderLight" in banner
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=HTTP_TIMEOUT_S).status_code == 200
        os.killpg(process.pid, signal.SIGINT)  # to the process group this test started
        assert process.wait(timeout=120) == 0, log.read_text()
        assert "stopped" in log.read_text() and "Traceback" not in log.read_text()
    finally:
        kill_group(process)


def _read_until(process: subprocess.Popen, marker: str, log: Path, timeout_s: float) -> str:
    """The process's stdout up to the line holding ``marker``."""
    lines: list[str] = []

    def read() -> None:
        for line in iter(process.stdout.readline, ""):
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not any(marker in line for line in lines):
        assert process.poll() is None, f"oi-ray serve exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"no {marker!r} within {timeout_s} s: {''.join(lines)}"
        time.sleep(0.5)
    return "".join(lines)


# The golden library (serve.golden_store): register a part's golden once, send only test shots.

def _deploy_beside_the_module_service(service: Service, *applications: list[str]) -> None:
    """Deploy applications (each given by its spec overrides) beside the module's service: a
    Serve config names every application that runs, so it names the module's too."""
    config = serve_config(service.config())
    for overrides in applications:
        config["applications"] += serve_config(service.config(*overrides))["applications"]
    deploy(config)


@pytest.fixture(scope="module")
def library_overrides(tmp_path_factory) -> list[str]:
    return ["serve.app_name=library", "serve.route_prefix=/lib",
            f"serve.golden_store={tmp_path_factory.mktemp('goldens')}"]


@pytest.fixture(scope="module")
def library(service, library_overrides) -> str:
    """The same model as a second application that keeps goldens in a folder; its route prefix."""
    _deploy_beside_the_module_service(service, library_overrides)
    yield "/lib"
    serve.delete("library")


def _golden_files(table: PairTable, rows: list[int]) -> list[tuple[str, tuple[str, bytes]]]:
    """A golden's PUT form: ``golden.<Light>`` for one shot, ``<shot>.golden.<Light>`` for a set."""
    prefix = (lambda shot: f"{shot}.") if len(rows) > 1 else (lambda shot: "")
    return [(f"{prefix(shot)}golden.{light}", (Path(path).name, Path(path).read_bytes()))
            for shot, row in enumerate(rows) for light, path in zip(LIGHTS, table.golden_paths[row], strict=True)]


def _test_only(table: PairTable, row: int, golden_id: str) -> dict:
    return {"id": f"row{row}", "golden_id": golden_id,
            "test": {light: base64.b64encode(Path(path).read_bytes()).decode()
                     for light, path in zip(LIGHTS, table.test_paths[row], strict=True)}}


def test_registered_goldens_score_every_test_row_like_uploaded_ones(service, library):
    table, offline = service.exported.table, service.exported.offline
    for row in range(len(table)):  # one golden per row: the part reference is the row here
        response = requests.put(service.url(f"/v1/goldens/P{row}", library), files=_golden_files(table, [row]),
                                timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 201, response.text
        assert response.json()["shots"] == 1 and response.json()["model"].startswith("oi_model.onnx@")
    answers = []
    for start in range(0, len(table), MAX_PAIRS):
        pairs = [_test_only(table, row, f"P{row}") for row in range(start, min(start + MAX_PAIRS, len(table)))]
        response = requests.post(service.url("/v1/inspect", library), json={"pairs": pairs}, timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 200, response.text
        answers += response.json()["results"]
    assert [answer["golden_id"] for answer in answers] == [f"P{row}" for row in range(len(table))]
    assert {answer["golden_shot"] for answer in answers} == {0}
    np.testing.assert_allclose([answer["distance"] for answer in answers], offline["siamese_score"], atol=1e-5, rtol=0)
    assert [answer["decision"] for answer in answers] == list(offline["decision"])
    # a request may mix both kinds of pair
    mixed = requests.post(service.url("/v1/inspect", library), timeout=HTTP_TIMEOUT_S,
                          json=[_json_pair(table, 2), _test_only(table, 3, "P3")]).json()["results"]
    assert [answer.get("golden_id") for answer in mixed] == [None, "P3"]
    np.testing.assert_allclose([answer["distance"] for answer in mixed], offline["siamese_score"][2:4], atol=1e-5)


def test_concurrent_requests_naming_goldens_each_get_their_own_distances(service, library):
    table, offline = service.exported.table, service.exported.offline
    rows = list(range(8))
    for row in rows:
        requests.put(service.url(f"/v1/goldens/B{row}", library), files=_golden_files(table, [row]),
                     timeout=HTTP_TIMEOUT_S).raise_for_status()

    def inspect(row: int) -> dict:
        return requests.post(service.url("/v1/inspect", library), json=_test_only(table, row, f"B{row}"),
                             timeout=HTTP_TIMEOUT_S).json()["results"][0]

    with concurrent.futures.ThreadPoolExecutor(len(rows)) as pool:  # batched together on the replica
        answers = list(pool.map(inspect, rows))
    assert [answer["golden_id"] for answer in answers] == [f"B{row}" for row in rows]
    np.testing.assert_allclose([answer["distance"] for answer in answers], offline["siamese_score"][rows],
                               atol=1e-5, rtol=0)


def test_a_golden_set_scores_against_its_nearest_shot(service, library):
    table, offline = service.exported.table, service.exported.offline
    assert requests.put(service.url("/v1/goldens/0603-10k", library), files=_golden_files(table, [4, 5, 6]),
                        timeout=HTTP_TIMEOUT_S).json()["shots"] == 3
    answer = requests.post(service.url("/v1/inspect", library), json=_test_only(table, 5, "0603-10k"),
                           timeout=HTTP_TIMEOUT_S).json()["results"][0]
    assert answer["golden_shot"] == 1  # row 5's own golden is the set's second shot
    assert answer["distance"] <= offline["siamese_score"][5] + 1e-5
    described = requests.get(service.url("/v1/goldens/0603-10k", library), timeout=HTTP_TIMEOUT_S).json()
    assert (described["golden_id"], described["shots"], described["lights"]) == ("0603-10k", 3, list(LIGHTS))


def test_each_golden_has_its_statistics_and_metrics(service, library):
    table, offline = service.exported.table, service.exported.offline
    requests.put(service.url("/v1/goldens/S1", library), files=_golden_files(table, [1]),
                 timeout=HTTP_TIMEOUT_S).raise_for_status()
    for _ in range(3):
        requests.post(service.url("/v1/inspect", library), json=[_test_only(table, 1, "S1")] * 2,
                      timeout=HTTP_TIMEOUT_S).raise_for_status()
    stats = requests.get(service.url("/v1/goldens/S1/stats", library), timeout=HTTP_TIMEOUT_S).json()
    flagged = int(offline["decision"][1] == "NO_PASS")
    assert (stats["golden_id"], stats["pairs"], stats["no_pass"], stats["recent_pairs"]) == ("S1", 6, 6 * flagged, 6)
    assert stats["mean_distance"] == pytest.approx(offline["siamese_score"][1], abs=1e-5)
    assert sum(stats["histogram"]["counts"]) == 6 and stats["replicas"] == 1
    name = "ray_oi_ray_golden_pair_distance_count"
    metrics = _poll_metrics(lambda text: _sum(text, name, 'golden_id="S1"') >= 6)
    assert _sum(metrics, name, 'golden_id="S1"') == 6
    unknown = requests.get(service.url("/v1/goldens/S2/stats", library), timeout=HTTP_TIMEOUT_S)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_golden"


def test_goldens_are_listed_in_pages_and_deleted(service, library):
    for golden_id in ("L1", "L2", "L3"):
        requests.put(service.url(f"/v1/goldens/{golden_id}", library), files=_golden_files(
            service.exported.table, [0]), timeout=HTTP_TIMEOUT_S).raise_for_status()
    first = requests.get(service.url("/v1/goldens?after=Kz&limit=2", library), timeout=HTTP_TIMEOUT_S).json()
    assert first == {"goldens": ["L1", "L2"], "next": "L2"}
    assert requests.get(service.url("/v1/goldens?after=L2&limit=2", library),
                        timeout=HTTP_TIMEOUT_S).json()["goldens"][0] == "L3"
    assert requests.delete(service.url("/v1/goldens/L2", library), timeout=HTTP_TIMEOUT_S).json() == {"deleted": "L2"}
    gone = requests.post(service.url("/v1/inspect", library), json=_test_only(service.exported.table, 0, "L2"),
                         timeout=HTTP_TIMEOUT_S)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_golden" and "'L2'" in gone.text


@pytest.mark.parametrize("case", ["missing lighting", "undecodable image", "bad id", "no library"])
def test_a_golden_that_cannot_be_kept_is_refused_and_nothing_is_stored(service, library, case):
    table = service.exported.table
    files = _golden_files(table, [0])
    golden_id, prefix, status, code = "R9", library, 422, {
        "missing lighting": "missing_image", "undecodable image": "undecodable_image",
        "bad id": "bad_golden_id", "no library": "no_golden_library"}[case]
    if case == "missing lighting":
        files = files[:-1]
    elif case == "undecodable image":
        files = [files[0], (files[1][0], ("x.png", b"not an image"))]
    elif case == "bad id":
        golden_id = "R 9"
    else:
        prefix, status = "", 404  # the module's service has no golden_store
    response = requests.put(service.url(f"/v1/goldens/{golden_id}", prefix), files=files, timeout=HTTP_TIMEOUT_S)
    assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    if case in ("missing lighting", "undecodable image"):
        message = response.json()["error"]["message"]
        assert message.startswith("shot 0: ") if case == "missing lighting" else "SolderLight of shot 0" in message
    lookup = requests.get(service.url("/v1/goldens/R9", library), timeout=HTTP_TIMEOUT_S)
    assert lookup.status_code == 404 and lookup.json()["error"]["code"] == "unknown_golden"


def test_a_replica_killed_and_replaced_serves_every_registered_golden(service, library):
    table, offline = service.exported.table, service.exported.offline
    requests.put(service.url("/v1/goldens/K8", library), files=_golden_files(table, [8]),
                 timeout=HTTP_TIMEOUT_S).raise_for_status()
    killed = requests.get(service.url("/healthz", library), timeout=HTTP_TIMEOUT_S).json()["replica"]
    ray.kill(ray_internals.serve_replica("library", DEPLOYMENT_NAME, killed), no_restart=True)
    _wait_for_a_replacement(service, library, killed)  # which reads the store
    answer = requests.post(service.url("/v1/inspect", library), json=_test_only(table, 8, "K8"),
                           timeout=HTTP_TIMEOUT_S).json()["results"][0]
    assert answer["distance"] == pytest.approx(offline["siamese_score"][8], abs=1e-5)


def test_a_redeployed_service_on_the_same_store_serves_every_registered_golden(service, library, library_overrides,
                                                                               tmp_path):
    table, offline = service.exported.table, service.exported.offline
    store = tmp_path / "store"
    overrides = ["serve.app_name=again", "serve.route_prefix=/again", f"serve.golden_store={store}"]
    _deploy_beside_the_module_service(service, library_overrides, overrides)
    requests.put(service.url("/v1/goldens/C12", "/again"), files=_golden_files(table, [7]),
                 timeout=HTTP_TIMEOUT_S).raise_for_status()
    serve.delete("again")
    _deploy_beside_the_module_service(service, library_overrides, overrides)  # new replicas, the same store
    try:
        answer = requests.post(service.url("/v1/inspect", "/again"), json=_test_only(table, 7, "C12"),
                               timeout=HTTP_TIMEOUT_S).json()["results"][0]
        assert answer["distance"] == pytest.approx(offline["siamese_score"][7], abs=1e-5)
    finally:
        serve.delete("again")
