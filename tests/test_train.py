"""oi-ray train on a real local Ray: files, epochs, resume, overrides, seeding, worker loss."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from oi_ray.checkpoint import load_checkpoint
from oi_ray.cli import main
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset

pytestmark = pytest.mark.ray
FAST = ["dataset.batch_size=8", "ray.num_workers=1"]


@pytest.fixture(scope="module")
def spec(ray_local, tmp_path_factory) -> Path:
    """A tiny synthetic dataset (2 lightings at 16x16) and its spec."""
    root = tmp_path_factory.mktemp("data")
    summary = synthesize_dataset(root, SyntheticSpec(num_pairs=120, lights=("WhiteLight", "SolderLight"),
                                                     width=16, height=16, image_ext=".png", seed=3))
    return summary.spec_path


def _train(spec: Path, results: Path, *overrides: str) -> int:
    return main(["train", "-e", str(spec), f"results_dir={results}", *FAST, *overrides])


def _status(results: Path) -> list[dict]:
    return [json.loads(line) for line in (results / "train/status.json").read_text().splitlines()]


def test_train_writes_tao_checkpoints_then_resumes_and_stops(spec, tmp_path, capsys):
    results = tmp_path / "run"
    assert _train(spec, results, "train.num_epochs=2") == 0
    train_dir = results / "train"
    assert sorted(p.name for p in train_dir.glob("*.pth")) == [
        "model_epoch_000.pth", "model_epoch_001.pth", "oi_model_latest.pth"]
    assert os.readlink(train_dir / "oi_model_latest.pth") == "model_epoch_001.pth"
    saved = load_checkpoint(train_dir / "oi_model_latest.pth")
    assert saved.epoch == 2 and saved.model_type == "Siamese_3" and saved.input_shape == (3, 32, 16)
    assert saved.optimizer_state["state"], "Adam moments are saved"
    assert "num_epochs: 2" in saved.config_yaml
    assert saved.threshold == pytest.approx(saved.extra["validation"]["threshold"]) and saved.threshold > 0
    epochs = _status(results)
    assert [line["epoch"] for line in epochs] == [1, 2]
    assert {"train_loss", "val_loss", "val_acc", "val_fpr", "val_auroc", "threshold"} <= set(epochs[1])
    assert 0.0 <= epochs[1]["val_auroc"] <= 1.0 and epochs[1]["train_loss"] > 0

    assert _train(spec, results, "train.num_epochs=3") == 0  # a rerun continues: epoch 3 only
    assert [line["epoch"] for line in _status(results)] == [1, 2, 3]
    assert os.readlink(train_dir / "oi_model_latest.pth") == "model_epoch_002.pth"
    assert load_checkpoint(train_dir / "model_epoch_002.pth").epoch == 3

    capsys.readouterr()
    assert _train(spec, results, "train.num_epochs=3") == 0
    assert "training already complete" in capsys.readouterr().err
    assert len(_status(results)) == 3


def test_resume_path_override_checkpoint_interval_and_pretrained(spec, tmp_path):
    first = tmp_path / "first"
    assert _train(spec, first, "train.num_epochs=3", "train.checkpoint_interval=2",
                  "train.validation_interval=2") == 0
    names = sorted(p.name for p in (first / "train").glob("model_epoch_*.pth"))
    assert names == ["model_epoch_001.pth", "model_epoch_002.pth"], "after epochs 2 and 3 (the last)"
    validated = [line["epoch"] for line in _status(first) if "val_loss" in line]
    assert validated == [2, 3]

    second = tmp_path / "second"
    start = first / "train/model_epoch_001.pth"  # after 2 epochs
    assert _train(spec, second, "train.num_epochs=4", f"train.resume_training_checkpoint_path={start}") == 0
    assert [line["epoch"] for line in _status(second)] == [3, 4]

    third = tmp_path / "third"  # pretrained weights only: training starts again at epoch 1
    assert _train(spec, third, "train.num_epochs=1", f"train.pretrained_model_path={start}") == 0
    assert [line["epoch"] for line in _status(third)] == [1]
    assert _status(third)[0]["train_loss"] < _status(first)[0]["train_loss"]


def test_one_worker_run_is_reproducible_with_a_seed(spec, tmp_path):
    states = []
    for name in ("a", "b"):
        assert _train(spec, tmp_path / name, "train.num_epochs=1", "train.validation_interval=1") == 0
        states.append(load_checkpoint(tmp_path / name / "train/oi_model_latest.pth").model_state)
    for key, value in states[0].items():
        torch.testing.assert_close(value, states[1][key], rtol=0, atol=0, msg=key)


def test_bad_resume_checkpoint_fails_before_training(spec, tmp_path, capsys):
    assert _train(spec, tmp_path, "train.resume_training_checkpoint_path=/nonexistent.pth") == 1
    assert "train.resume_training_checkpoint_path='/nonexistent.pth': no such file" in capsys.readouterr().err
    assert _train(spec, tmp_path, "dataset.batch_size=500") == 1
    assert "less than one batch of dataset.batch_size=500" in capsys.readouterr().err
    assert _train(spec, tmp_path, "ray.num_workers=4") == 1  # the fixture's Ray has 4 CPUs
    assert "= 4 CPUs leave none of the cluster's 4 for Ray Data" in capsys.readouterr().err


def test_killed_worker_resumes_from_last_checkpoint(spec, tmp_path, capsys):
    """Two gloo workers; one is SIGKILLed mid-run; the group restarts from the last checkpoint."""
    results = tmp_path / "ft"
    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(code=main([
        "train", "-e", str(spec), f"results_dir={results}", "dataset.batch_size=8",
        "ray.num_workers=2", "ray.max_failures=1", "train.num_epochs=8"])))
    run.start()
    # Epoch 2's file means epoch 1 is a registered Ray Train checkpoint (reported before epoch 2).
    second = results / "train/model_epoch_001.pth"
    deadline = time.monotonic() + 120
    while not second.exists() and time.monotonic() < deadline and run.is_alive():
        time.sleep(0.1)
    assert second.exists(), "the second checkpoint appears"
    victims = _train_worker_pids()
    assert len(victims) == 2
    os.kill(victims[-1], signal.SIGKILL)
    run.join(timeout=300)
    assert outcome.get("code") == 0
    err = capsys.readouterr().err
    assert "worker group restarted: continuing after epoch" in err
    epochs = [line["epoch"] for line in _status(results)]
    assert epochs[0] == 1 and epochs[-1] == 8 and set(epochs) == set(range(1, 9))
    assert os.readlink(results / "train/oi_model_latest.pth") == "model_epoch_007.pth"
    assert load_checkpoint(results / "train/oi_model_latest.pth").epoch == 8


def _train_worker_pids() -> list[int]:
    """Processes Ray titled as Ray Train workers (``ray::RayTrainWorker...``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if command.startswith(b"ray::RayTrainWorker"):
                pids.append(int(entry.name))
    return sorted(pids)
