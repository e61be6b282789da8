"""Beyond one machine: which Ray a command uses, and tasks submitted as Ray Jobs to a real
multi-node Ray cluster on this machine (several `ray start` nodes)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from loopback_cluster import LoopbackCluster, free_port

from oi_ray.cli import main
from oi_ray.config.schema import RayConfig
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.errors import ConfigError
from oi_ray.runtime import ray_session


def test_an_address_nobody_answers_is_one_clear_error_at_once(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    port = free_port()
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"ray.address=127.0.0.1:{port}: no Ray cluster answers at \S+:{port}$"), \
            ray_session(RayConfig(address=f"127.0.0.1:{port}")):
        pass
    assert time.monotonic() - start < 30  # Ray itself retries for minutes
    assert "RAY_AUTH_MODE" not in os.environ  # never switched off for a cluster oi-ray did not start


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


def _train_worker_nodes(cluster: LoopbackCluster) -> set[str]:
    query = "filter_keys=class_name&filter_predicates=%3D&filter_values=RayTrainWorker&detail=true&limit=100"
    request = urllib.request.Request(f"{cluster.address}/api/v0/actors?{query}", headers=cluster.headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return {actor["node_id"] for actor in json.load(response)["data"]["result"]["result"]}


@pytest.mark.ray
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
def test_ctrl_c_leaves_the_job_running_and_job_commands_reach_it(cluster, spec, tmp_path, capsys):
    """Non-interactive Ctrl-C while following a job, then status / logs / list / stop."""
    command = [sys.executable, "-m", "oi_ray.cli", "train", "-e", str(spec), "--address", cluster.address,
               f"results_dir={tmp_path}", "ray.num_workers=1", "dataset.batch_size=8", "train.num_epochs=500",
               "ray.job_id=long"]
    log = tmp_path / "follow.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "epoch 1/500" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 130, log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "job long is left running; follow it with" in log.read_text()
    assert "job stop long --address" in log.read_text()

    capsys.readouterr()
    assert main(["job", "status", "long", "--address", cluster.address]) == 0
    assert capsys.readouterr().out.startswith("long: RUNNING")
    assert main(["job", "list", "--address", cluster.address]) == 0
    assert re.search(r"^long\s+RUNNING\s+train", capsys.readouterr().out, re.MULTILINE)
    assert main(["job", "logs", "long", "--address", cluster.address]) == 0
    assert "epoch 1/500" in capsys.readouterr().out
    assert main(["job", "stop", "long", "--address", cluster.address]) == 0
    assert capsys.readouterr().out == "long: stop requested\n"
    deadline = time.monotonic() + 60
    while True:
        assert main(["job", "status", "long", "--address", cluster.address]) == 0
        if capsys.readouterr().out.startswith("long: STOPPED"):
            break
        assert time.monotonic() < deadline
        time.sleep(1)
    assert main(["job", "status", "nosuchjob", "--address", cluster.address]) == 1
    assert "no job 'nosuchjob' on" in capsys.readouterr().err


def test_a_job_server_that_does_not_answer_is_one_clear_error(capsys):
    address = f"http://127.0.0.1:{free_port()}"
    assert main(["job", "list", "--address", address]) == 1
    assert capsys.readouterr().err == f"oi-ray job: error: --address {address}: no Ray job server answers there\n"
