"""Training under faults: a killed worker, a diverging loss, Ctrl-C in a real `oi-ray train`."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from helpers import kill_group, start_interruptible
from ray.util.state import list_actors

from oi_ray.checkpoint import load_checkpoint
from oi_ray.cli import main
from oi_ray.config.schema import RayConfig
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.runtime import ray_session

pytestmark = pytest.mark.ray
FAST = ["dataset.batch_size=8", "ray.num_workers=1"]


@pytest.fixture(scope="module")
def ray_with_state_api():
    """A local Ray with its dashboard, whose state API finds this test's own workers."""
    with ray_session(RayConfig(num_cpus=4, object_store_memory_mb=512, include_dashboard=True)):
        yield


@pytest.fixture(scope="module")
def spec(ray_with_state_api, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return synthesize_dataset(root, SyntheticSpec(num_pairs=120, lights=("WhiteLight", "SolderLight"),
                                                  width=16, height=16, image_ext=".png", seed=3)).spec_path


def _status(results: Path) -> list[dict]:
    return [json.loads(line) for line in (results / "train/status.json").read_text().splitlines()]


def _wait_for(path: Path, alive, seconds: float = 180) -> bool:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline and alive():
        time.sleep(0.05)
    return path.exists()


def _own_train_worker_pids() -> list[int]:
    """Process ids of this test's Ray Train workers, from Ray's state API (this job's actors only)."""
    job = ray.get_runtime_context().get_job_id()
    actors = list_actors(filters=[("state", "=", "ALIVE"), ("job_id", "=", job)], detail=True)
    return sorted(actor.pid for actor in actors if actor.class_name == "RayTrainWorker")


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(spec, tmp_path, capsys):
    """Two gloo workers; one is SIGKILLed mid-run; the group restarts from the last checkpoint.
    The other worker cannot finish an epoch without its peer (every step's gradient all-reduce
    needs both), so the run cannot end before the restart; a few epochs after it show it went on."""
    results = tmp_path / "ft"
    epochs = 10
    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(code=main([
        "train", "-e", str(spec), f"results_dir={results}", "dataset.batch_size=8",
        "ray.num_workers=2", "ray.max_failures=1", f"train.num_epochs={epochs}"])))
    run.start()
    # Ray Train restarts from the checkpoints its controller has registered (it polls the workers
    # every 2 s); it records them in the run's checkpoint_manager_snapshot.json.
    assert _wait_for(results / "train/model_epoch_001.pth", run.is_alive), "the second checkpoint appears"
    deadline = time.monotonic() + 60
    while not list((results / "train/ray").glob("*/checkpoint_manager_snapshot.json")) and run.is_alive() \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    victims = _own_train_worker_pids()
    assert len(victims) == 2
    os.kill(victims[-1], signal.SIGKILL)
    run.join(timeout=400)
    assert outcome.get("code") == 0
    restarted = re.search(r"worker group restarted: continuing after epoch (\d+)", capsys.readouterr().err)
    assert restarted and int(restarted.group(1)) >= 1
    logged = [line["epoch"] for line in _status(results)]
    assert logged[0] == 1 and logged[-1] == epochs and set(logged) == set(range(1, epochs + 1))
    assert len(logged) > epochs, "the epoch that was running when the worker died ran again"
    assert os.readlink(results / "train/oi_model_latest.pth") == f"model_epoch_{epochs - 1:03d}.pth"
    assert load_checkpoint(results / "train/oi_model_latest.pth").epoch == epochs


def test_diverging_loss_stops_at_once_and_keeps_the_last_good_checkpoint(spec, tmp_path, capsys):
    results = tmp_path / "nan"
    common = ["train", "-e", str(spec), f"results_dir={results}", *FAST]
    assert main([*common, "train.num_epochs=2"]) == 0
    latest = results / "train/oi_model_latest.pth"
    good = latest.read_bytes()
    capsys.readouterr()

    assert main([*common, "train.num_epochs=4", "train.optim.lr=1e30"]) == 1
    err = capsys.readouterr().err
    assert "error: training diverged: the loss became NaN or infinite at epoch 3, step 2 of 9" in err
    assert "oi_model_latest.pth -> model_epoch_001.pth (2 of 4 epochs done)" in err
    assert "Try a lower train.optim.lr (now 1e+30) or set train.clip_grad_norm" in err
    assert "Traceback" not in err
    assert os.readlink(latest) == "model_epoch_001.pth" and latest.read_bytes() == good
    assert sorted(p.name for p in (results / "train").glob("*.pth")) == [
        "model_epoch_000.pth", "model_epoch_001.pth", "oi_model_latest.pth"]
    assert [line["epoch"] for line in _status(results)] == [1, 2], "the diverged epoch is not logged"


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_a_rerun_resumes(spec, tmp_path):
    """SIGINT to the process group, as a terminal's Ctrl-C sends it, then the same command again."""
    results = tmp_path / "interrupted"
    command = [sys.executable, "-m", "oi_ray.cli", "train", "-e", str(spec), f"results_dir={results}",
               "train.num_epochs=60", *FAST]
    process = start_interruptible(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(results / "train/model_epoch_002.pth", lambda: process.poll() is None)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        kill_group(process)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    final = err.strip().splitlines()[-1]
    assert final.startswith("oi-ray train: stopped during epoch "), err
    assert f"a rerun of the same command resumes from {results / 'train/oi_model_latest.pth'} -> " in final
    train_dir = results / "train"
    assert not list(train_dir.glob(".*")), "no temporary or half-written files"
    done = load_checkpoint(train_dir / "oi_model_latest.pth").epoch
    assert 3 <= done < 60
    assert f"({done} of 60 epochs done)" in final

    rerun = subprocess.run([*command[:-3], f"train.num_epochs={done + 1}", *FAST], capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {train_dir / 'oi_model_latest.pth'} (epoch {done})" in rerun.stderr
    assert load_checkpoint(train_dir / "oi_model_latest.pth").epoch == done + 1
