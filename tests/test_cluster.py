"""Beyond one machine: which Ray a command uses, and tasks submitted as Ray Jobs to a real
multi-node Ray cluster on this machine (several `ray start` nodes)."""

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from helpers import ctrl_c_once_logged, free_port
from loopback_cluster import LoopbackCluster
from ray.job_submission import JobSubmissionClient

from oi_ray.cli import main
from oi_ray.config.schema import RayConfig
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.errors import ConfigError
from oi_ray.runtime import WORKER_ALLOCATOR_ENV, _worker_runtime_env, ray_session


def test_an_address_nobody_answers_is_one_clear_error_at_once(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    port = free_port()
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"ray.address=127.0.0.1:{port}: no Ray cluster answers at \S+:{port}$"), \
            ray_session(RayConfig(address=f"127.0.0.1:{port}")):
        pass
    assert time.monotonic() - start < 30  # Ray itself retries for minutes
    assert "RAY_AUTH_MODE" not in os.environ  # never switched off for a cluster oi-ray did not start


def test_the_workers_allocator_settings_leave_those_the_driver_has(monkeypatch):
    """A Ray job's own env_vars are in its driver's environment: giving Ray the same key again
    would fail the job ("Failed to merge the Job's runtime env"), and the user's value must win."""
    for name in WORKER_ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    assert _worker_runtime_env() == {"env_vars": WORKER_ALLOCATOR_ENV}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert _worker_runtime_env() == {"env_vars": {name: value for name, value in WORKER_ALLOCATOR_ENV.items()
                                                  if name != "MALLOC_ARENA_MAX"}}


def test_a_job_server_address_is_not_a_ray_address():
    with pytest.raises(ConfigError, match="is a dashboard / job server address: give it as --address"), \
            ray_session(RayConfig(address="http://127.0.0.1:8265")):
        pass


@pytest.fixture(scope="module")
def cluster():
    """A head node without CPUs (the job server, drivers) and two 1-CPU worker nodes."""
    started = LoopbackCluster(head_cpus=0)
    try:
        started.add_node("node_a")
        started.add_node("node_b")
        yield started
    finally:
        started.shutdown()


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster")
    return synthesize_dataset(root / "data", SyntheticSpec(num_pairs=160, lights=("A", "B"), width=16, height=16,
                                                           image_ext=".png", seed=5)).spec_path


def _train_worker_nodes(cluster: LoopbackCluster, alive_only: bool = False) -> set[str]:
    """The nodes that host (or hosted) Ray Train workers, from the state API."""
    query = "filter_keys=class_name&filter_predicates=%3D&filter_values=RayTrainWorker&detail=true&limit=100"
    if alive_only:
        query += "&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE"
    request = urllib.request.Request(f"{cluster.address}/api/v0/actors?{query}", headers=cluster.headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return {actor["node_id"] for actor in json.load(response)["data"]["result"]["result"]}


@pytest.mark.ray
@pytest.mark.slow
def test_a_training_job_trains_across_nodes_and_a_resubmission_resumes(cluster, spec, tmp_path, capsys):
    results = tmp_path / "results"
    common = ["train", "-e", str(spec), "--address", cluster.address, f"results_dir={results}",
              "ray.num_workers=2", "dataset.batch_size=8", "ray.job_id=run1"]
    assert main([*common, "train.num_epochs=2"]) == 0
    output = capsys.readouterr()
    assert "submitted job run1 (oi-ray train, run run1)" in output.err
    assert "epoch 2/2" in output.out + output.err  # the job's own log lines, streamed
    assert "job run1 succeeded" in output.err
    # rank 0 wrote TAO's files on the shared path; the two workers ran on the two CPU nodes
    train = results / "train"
    assert sorted(path.name for path in train.glob("*.pth")) == [
        "model_epoch_000.pth", "model_epoch_001.pth", "oi_model_latest.pth"]
    worker_nodes = {node["node_id"] for node in cluster.alive_nodes() if node["resources_total"].get("CPU")}
    assert _train_worker_nodes(cluster) == worker_nodes and len(worker_nodes) == 2
    assert (results / "train" / "ray" / "run1").is_dir()  # the Ray Train run is named after the job

    assert main([*common, "train.num_epochs=3"]) == 0
    output = capsys.readouterr()
    assert "run run1 ran before as job run1 (SUCCEEDED): submitting it as run1-2" in output.err
    assert "resuming from" in output.out + output.err
    epochs = [json.loads(line)["epoch"] for line in (train / "status.json").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert os.readlink(train / "oi_model_latest.pth") == "model_epoch_002.pth"


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_runs_as_a_job(cluster, spec, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["tune", "-e", str(spec), "--address", cluster.address, f"results_dir={results}",
                 "train.num_epochs=1", "dataset.batch_size=8", "ray.job_id=sweep", "tune.search_alg=grid",
                 "tune.num_samples=1", "tune.scheduler.type=none",
                 "tune.search_space={model.margin: {type: grid, values: [1.0, 2.0]}}"]) == 0
    output = capsys.readouterr()
    assert "submitted job sweep (oi-ray tune, run sweep)" in output.err and "job sweep succeeded" in output.err
    sweep = results / "tune" / "sweep"
    table = pd.read_csv(sweep / "results.csv")
    assert sorted(table["model.margin"]) == [1.0, 2.0] and (table["status"] == "completed").all()
    assert f"best: {table.loc[table['last_val_auroc'].idxmax(), 'trial']} (last val_auroc" in output.out
    assert (sweep / "best" / "oi_model_latest.pth").resolve().name == "model_epoch_000.pth"


@contextlib.contextmanager
def _stopped_at_the_end(cluster: LoopbackCluster, job_id: str):
    """The job stopped when the block ends, however it ends: a test that failed half-way leaves
    nothing running on the module's cluster for the next test to queue behind."""
    try:
        yield
    finally:
        with contextlib.suppress(RuntimeError):  # never submitted
            JobSubmissionClient(cluster.address, headers=cluster.headers).stop_job(job_id)


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_leaves_the_job_running_and_job_commands_reach_it(cluster, spec, tmp_path, capsys):
    """Non-interactive Ctrl-C while following a job, then status / logs / list / stop."""
    command = [sys.executable, "-m", "oi_ray.cli", "train", "-e", str(spec), "--address", cluster.address,
               f"results_dir={tmp_path}", "ray.num_workers=1", "dataset.batch_size=8", "train.num_epochs=500",
               "ray.job_id=long"]
    with _stopped_at_the_end(cluster, "long"):
        logs = ctrl_c_once_logged(command, tmp_path / "follow.log", "epoch 1/500", timeout_s=240)
        assert "job long is left running; follow it with" in logs
        assert "job stop long --address" in logs

        capsys.readouterr()
        assert main(["job", "status", "long", "--address", cluster.address]) == 0
        assert capsys.readouterr().out.startswith("long: RUNNING")
        assert main(["job", "list", "--address", cluster.address]) == 0
        assert re.search(r"^long\s+RUNNING\s+train", capsys.readouterr().out, re.MULTILINE)
        assert main(["job", "logs", "long", "--address", cluster.address]) == 0
        assert "epoch 1/500" in capsys.readouterr().out
        # following it again from a terminal: Ctrl-C asks; "n" leaves it running, "y" stops it
        follow = [sys.executable, "-m", "oi_ray.cli", "job", "logs", "long", "--follow",
                  "--address", cluster.address]
        logs = ctrl_c_once_logged(follow, tmp_path / "no.log", "epoch 1/500", timeout_s=120, answer="n")
        assert "stop job long on the cluster? [y/N] " in logs and "job long is left running" in logs
        assert main(["job", "status", "long", "--address", cluster.address]) == 0
        assert capsys.readouterr().out.startswith("long: RUNNING")
        logs = ctrl_c_once_logged(follow, tmp_path / "yes.log", "epoch 1/500", timeout_s=120, answer="y")
        assert "oi-ray job: job long stopped\n" in logs
        deadline = time.monotonic() + 60
        while True:
            assert main(["job", "status", "long", "--address", cluster.address]) == 0
            if capsys.readouterr().out.startswith("long: STOPPED"):
                break
            assert time.monotonic() < deadline
            time.sleep(1)
        assert main(["job", "stop", "long", "--address", cluster.address]) == 0
        assert capsys.readouterr().out == "long: not running (STOPPED)\n"
        assert main(["job", "status", "nosuchjob", "--address", cluster.address]) == 1
        assert "no job 'nosuchjob' on" in capsys.readouterr().err


@pytest.mark.ray
def test_a_command_on_a_cluster_machine_joins_by_ray_address(cluster, spec, tmp_path):
    """``ray.address`` = the cluster's GCS address: the command's own process is the driver (no
    job), as on the head node; its training worker and decoding run on the worker nodes."""
    results = tmp_path / "results"
    command = [sys.executable, "-m", "oi_ray.cli", "train", "-e", str(spec), f"results_dir={results}",
               f"ray.address=127.0.0.1:{cluster.gcs_port}", "train.num_epochs=1", "dataset.batch_size=8"]
    finished = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"connecting to Ray cluster at 127.0.0.1:{cluster.gcs_port}" in finished.stderr
    assert os.readlink(results / "train" / "oi_model_latest.pth") == "model_epoch_000.pth"


def test_a_job_server_that_does_not_answer_is_one_clear_error(capsys):
    address = f"http://127.0.0.1:{free_port()}"
    assert main(["job", "list", "--address", address]) == 1
    assert capsys.readouterr().err == f"oi-ray job: error: --address {address}: no Ray job server answers there\n"


def _can_unshare() -> bool:
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
    return probe.returncode == 0


def _node_local(folder: Path) -> list[str]:
    """A command prefix: run the node in its own mount namespace where ``folder`` is an empty
    tmpfs, so the node sees its own disk there, as a node without the shared mount would."""
    mount = f'mount -t tmpfs tmpfs {shlex.quote(str(folder))} && exec "$0" "$@"'
    return ["unshare", "-Urm", "sh", "-c", mount]


@pytest.mark.ray
def test_a_path_one_node_does_not_see_fails_before_training(cluster, spec, tmp_path, capsys):
    if not _can_unshare():
        pytest.skip("needs user and mount namespaces (unshare -Urm) to give one node a disk of its own")
    local = tmp_path / "node_local"
    local.mkdir()
    cluster.add_node("node_c", prefix=_node_local(local))
    try:
        assert main(["train", "-e", str(spec), "--address", cluster.address, f"results_dir={local / 'results'}",
                     "dataset.batch_size=8", "train.num_epochs=1", "ray.job_id=paths"]) == 1
    finally:
        cluster.kill_node("node_c")
    output = capsys.readouterr()
    logs = output.out + output.err
    assert "this run spreads over 3 nodes, and each must see these paths:" in logs
    assert re.search(rf"train.results_dir={local / 'results' / 'train'} is not visible from node \S+ \(id \w+\)", logs)
    assert f"ray.storage_path={local / 'results' / 'train' / 'ray'} is not visible from node" in logs
    assert "dataset.train_dataset.images_dir" not in logs  # the images are shared
    assert "job paths failed" in output.err
    train = local / "results" / "train"
    assert not list(train.glob("*.pth")) and not list(train.glob(".oi-ray-shared-check-*"))


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_node_that_dies_mid_run_is_replaced_from_the_last_checkpoint(spec, tmp_path, capsys):
    """Its own cluster of three 1-CPU nodes: two workers, one node killed (SIGKILL) after the
    second checkpoint; the group restarts on the nodes left and the job finishes."""
    three = LoopbackCluster(head_cpus=0)
    # the node dies after the second checkpoint; the surviving worker then waits in its
    # gradient all-reduce until Ray Train restarts the group, so the run cannot end before
    # the failure is noticed, and a few epochs after the restart show that it went on
    epochs = 6
    try:
        for name in ("node_a", "node_b", "node_c"):
            three.add_node(name)
        results = tmp_path / "results"
        assert main(["train", "-e", str(spec), "--address", three.address, f"results_dir={results}", "--no-wait",
                     "ray.num_workers=2", "ray.max_failures=1", "dataset.batch_size=8", f"train.num_epochs={epochs}",
                     "ray.job_id=survivor"]) == 0
        assert capsys.readouterr().out == "survivor\n"
        deadline = time.monotonic() + 300
        while not (results / "train" / "model_epoch_001.pth").exists():
            assert time.monotonic() < deadline, "no second checkpoint"
            time.sleep(0.5)
        hosts = _train_worker_nodes(three, alive_only=True)
        victim = next(node["resources_total"] for node in three.alive_nodes() if node["node_id"] in hosts)
        three.kill_node(next(name for name in ("node_a", "node_b", "node_c") if name in victim))
        assert main(["job", "logs", "survivor", "--follow", "--address", three.address]) == 0
    finally:
        three.shutdown()
    logs = capsys.readouterr()
    restarted = re.search(r"worker group restarted: continuing after epoch (\d+)", logs.out + logs.err)
    # from the last checkpoint Ray Train had registered (its controller polls every 2 s): epoch 1 or 2
    assert restarted and int(restarted.group(1)) >= 1
    logged = [json.loads(line)["epoch"] for line in (results / "train" / "status.json").read_text().splitlines()]
    assert set(logged) == set(range(1, epochs + 1)) and logged[-1] == epochs
    assert os.readlink(results / "train" / "oi_model_latest.pth") == f"model_epoch_{epochs - 1:03d}.pth"


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


@pytest.mark.ray
@pytest.mark.slow
def test_export_and_evaluate_as_jobs_then_serve_address_deploys_beside_other_applications(cluster, spec, tmp_path,
                                                                                         monkeypatch, capsys):
    results = tmp_path / "results"
    common = ["-e", str(spec), "--address", cluster.address, f"results_dir={results}", "dataset.batch_size=8"]
    assert main(["train", *common, "train.num_epochs=1", "ray.job_id=to-serve"]) == 0
    assert main(["export", *common, "ray.job_id=to-serve-export"]) == 0
    onnx = results / "export" / "oi_model.onnx"
    assert onnx.is_file()
    # RAY_ADDRESS holding the job server's URL submits too (here: evaluate, scoring on the workers)
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    local = [argument for argument in common if argument not in ("--address", cluster.address)]
    assert main(["evaluate", *local, "ray.job_id=to-serve-evaluate"]) == 0
    monkeypatch.delenv("RAY_ADDRESS")
    assert 0.0 <= json.loads((results / "evaluate" / "metrics.json").read_text())["auroc"] <= 1.0
    # inference as a job with the spec's runtime environment: env vars, and a working dir Ray uploads
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("travels with the job\n")
    runtime_env = f"ray.runtime_env={{env_vars: {{OI_RAY_LINE: smt-3}}, working_dir: {workdir}}}"
    assert main(["inference", *common, f"inference.checkpoint={onnx}", "ray.job_id=to-serve-inference",
                 runtime_env]) == 0
    scored = (results / "inference" / "inference.csv").read_text().splitlines()
    assert len(scored) == len((spec.parent / "test.csv").read_text().splitlines())  # a header and every pair
    recorded = JobSubmissionClient(cluster.address, headers=cluster.headers).get_job_info("to-serve-inference")
    assert recorded.runtime_env["env_vars"]["OI_RAY_LINE"] == "smt-3"
    assert recorded.runtime_env["working_dir"].startswith("gcs://_ray_pkg_")  # uploaded by the submission
    port = free_port()
    serve = ["serve", *common, f"serve.port={port}", "serve.proxy_location=HeadOnly", "serve.num_cpus=0.5"]
    capsys.readouterr()
    assert main([*serve, "serve.app_name=first", "serve.route_prefix=/first"]) == 0
    assert main([*serve, "serve.app_name=second", "serve.route_prefix=/second", "serve.threshold=0.5"]) == 0
    output = capsys.readouterr()
    assert f"application 'second' runs on the cluster at http://127.0.0.1:{port}/second/" in output.out
    assert "deploying application 'second' to" in output.err and "(1 other application(s) kept)" in output.err
    for prefix, threshold in (("/first", None), ("/second", 0.5)):  # the first one was kept
        card = _get_json(f"http://127.0.0.1:{port}{prefix}/v1/model")
        assert card["file"] == str(onnx)
        assert threshold is None or card["threshold"]["value"] == threshold


@pytest.mark.ray
@pytest.mark.slow
def test_a_cluster_with_token_authentication_takes_the_users_token(spec, tmp_path, monkeypatch, capsys):
    from ray._raylet import AuthenticationTokenLoader

    secured = LoopbackCluster(head_cpus=1, token="oi-ray-test-token-0123456789abcdef")
    try:
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token of this machine's user
        for variable in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
            monkeypatch.delenv(variable, raising=False)
        for token, expected in ((None, "the cluster requires a Ray token and none was found (Authentication "
                                       "required"),
                                ("wrong-token", "the cluster refused this Ray token (Authentication failed")):
            if token:
                monkeypatch.setenv("RAY_AUTH_TOKEN", token)
            AuthenticationTokenLoader.instance().reset_cache()
            assert main(["job", "list", "--address", secured.address]) == 1
            error = capsys.readouterr().err
            assert error.startswith(f"oi-ray job: error: --address {secured.address}: {expected}")
            assert "give the cluster's token as RAY_AUTH_TOKEN" in error
        monkeypatch.setenv("RAY_AUTH_TOKEN", "oi-ray-test-token-0123456789abcdef")
        AuthenticationTokenLoader.instance().reset_cache()
        assert main(["train", "-e", str(spec), "--address", secured.address, f"results_dir={tmp_path / 'results'}",
                     "dataset.batch_size=8", "train.num_epochs=1", "ray.job_id=secured"]) == 0
        assert (tmp_path / "results" / "train" / "model_epoch_000.pth").is_file()
    finally:
        AuthenticationTokenLoader.instance().reset_cache()
        secured.shutdown()


CLUSTER_YAML = """\
cluster_name: oi-ray-test
max_workers: 0
provider:
  type: external
  module: local_node_provider.LocalNodeProvider
  state_file: {run}/nodes.json
auth:
  ssh_user: oi-ray
available_node_types:
  head:
    resources: {{CPU: 1}}
    node_config: {{}}
    max_workers: 0
head_node_type: head
# (an external provider gets no defaults from Ray: every section is spelt out)
upscaling_speed: 1.0
idle_timeout_minutes: 5
docker: {{}}
file_mounts: {{}}
cluster_synced_files: []
file_mounts_sync_continuously: false
rsync_exclude: []
rsync_filter: []
initialization_commands: []
setup_commands: []
head_setup_commands: []
worker_setup_commands: []
head_start_ray_commands:
  - RAY_AUTH_MODE=disabled setsid {ray} start --head --block --port={gcs} --dashboard-host=127.0.0.1
    --dashboard-port={dashboard} --dashboard-agent-listen-port={agent} --num-cpus=1 --temp-dir={run} --disable-usage-stats
    --object-store-memory=268435456 > {run}/head.log 2>&1 < /dev/null & echo $! > {run}/head.pid
  # like `ray start` without --block: return once the head's job server answers
  - for attempt in $(seq 120); do {python} -c "import socket; socket.create_connection(('127.0.0.1', {dashboard}), 1)"
    2>/dev/null && break; sleep 1; done
worker_start_ray_commands: []
"""


@pytest.mark.ray
@pytest.mark.slow
def test_cluster_yaml_brings_the_cluster_up_once_and_runs_tasks_on_it(spec, tmp_path):
    """`--cluster` through Ray's real launcher (autoscaler SDK), with a node provider whose
    machine is this one (tests/local_node_provider.py): twice, and the head is not restarted."""
    run = Path(tempfile.mkdtemp(prefix="oic-", dir="/tmp"))  # short: Ray's sockets live below it
    cluster_yaml = tmp_path / "cluster.yaml"
    cluster_yaml.write_text(CLUSTER_YAML.format(run=run, ray=Path(sys.executable).with_name("ray"),
                                                python=sys.executable, gcs=free_port(), dashboard=free_port(),
                                                agent=free_port()))
    home = tmp_path / "home"  # the launcher writes ~/ray_bootstrap_config.yaml "on the head"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(Path(__file__).parent),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "oi_ray.cli", "train", "-e", str(spec), "--cluster", str(cluster_yaml),
               f"results_dir={tmp_path / 'results'}", "dataset.batch_size=8", "ray.job_id=board"]
    try:
        first = subprocess.run([*command, "train.num_epochs=1"], env=env, capture_output=True, text=True,
                               timeout=600)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert "bringing up Ray cluster 'oi-ray-test'" in first.stderr
        assert "job board succeeded" in first.stderr
        head = int((run / "head.pid").read_text())
        second = subprocess.run([*command, "train.num_epochs=2"], env=env, capture_output=True, text=True,
                                timeout=600)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert int((run / "head.pid").read_text()) == head  # the running head was kept
        assert "submitting it as board-2" in second.stderr
        train = tmp_path / "results" / "train"
        assert os.readlink(train / "oi_model_latest.pth") == "model_epoch_001.pth"
    finally:
        if (run / "head.pid").exists():
            head = int((run / "head.pid").read_text())
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head, signal.SIGKILL)  # the head's process group, which setsid made for it
        shutil.rmtree(run, ignore_errors=True)
