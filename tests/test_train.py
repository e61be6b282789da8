"""oi-ray train on a real local Ray: files, epochs, resume, overrides, seeding, worker loss."""

import json
import os
import statistics
import struct
from pathlib import Path

import pytest
import torch
from helpers import spec_model

from oi_ray.checkpoint import load_checkpoint
from oi_ray.cli import main
from oi_ray.config import load_config
from oi_ray.data.assemble import InputGeometry, read_pictures
from oi_ray.data.pairs import load_split
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.metrics import auroc, calibrate

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


@pytest.mark.slow
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
    torch.load(train_dir / "oi_model_latest.pth", weights_only=True)  # plain tensors and numbers only
    epochs = _status(results)
    assert [line["epoch"] for line in epochs] == [1, 2]
    assert {"train_loss", "val_loss", "val_acc", "val_fpr", "val_auroc", "threshold"} <= set(epochs[1])
    assert epochs[1]["train_loss"] > 0

    # Validation scored the validation split with the final weights: recompute it here.
    config = load_config(train_dir / "spec.yaml")
    assert config.train.num_epochs == 2 and config.results_dir == str(results), "the resolved spec is saved"
    table = load_split(config.dataset, "validation_dataset")
    geometry = InputGeometry.from_config(config.dataset)
    distances = spec_model(train_dir / "oi_model_latest.pth", config).load().distances(
        read_pictures(table.test_paths, geometry), read_pictures(table.golden_paths, geometry))
    assert epochs[1]["val_auroc"] == pytest.approx(auroc(distances, table.targets), abs=1e-6)
    # the default rule: every validation defect is caught, with the safety margin below the weakest
    assert saved.threshold == pytest.approx(calibrate(distances, table.targets, config.train.calibration).threshold,
                                            rel=1e-5)
    assert saved.threshold <= 0.95 * distances[table.targets == 1].min()

    assert _train(spec, results, "train.num_epochs=3") == 0  # a rerun continues: epoch 3 only
    assert [line["epoch"] for line in _status(results)] == [1, 2, 3]
    assert os.readlink(train_dir / "oi_model_latest.pth") == "model_epoch_002.pth"
    assert load_checkpoint(train_dir / "model_epoch_002.pth").epoch == 3

    capsys.readouterr()
    assert _train(spec, results, "train.num_epochs=3") == 0
    assert "training already complete" in capsys.readouterr().err
    assert len(_status(results)) == 3


@pytest.mark.slow
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


def _tensorboard_events(folder: Path) -> list:
    """Every event of the TFRecord event files in ``folder`` (length, crc, payload, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        while data:
            (length,) = struct.unpack("<Q", data[:8])
            events.append(Event.FromString(data[12:12 + length]))
            data = data[12 + length + 4:]
    return events


def test_tensorboard_event_files(spec, tmp_path):
    results = tmp_path / "tb"
    assert _train(spec, results, "train.num_epochs=2", "train.tensorboard.enabled=true",
                  "train.tensorboard.infrequent_logging_frequency=2") == 0
    values = [(value.tag, event.step, value) for event in _tensorboard_events(results / "train/tensorboard")
              for value in event.summary.value]
    losses = [(step, value.simple_value) for tag, step, value in values if tag == "train_loss"]
    assert losses == [(line["epoch"], pytest.approx(line["train_loss"])) for line in _status(results)]
    assert [step for tag, step, _ in values if tag == "val_auroc"] == [1, 2]
    histograms = [(step, value.histo.num) for tag, step, value in values if tag == "weights/fc1.0.weight"]
    assert histograms == [(2, 512 * 8 * 32 * 16)], "every 2nd epoch, every weight of the first Linear"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 NVIDIA GPUs; this machine has fewer")
def test_two_gpu_workers_train_with_nccl(spec, tmp_path):
    results = tmp_path / "gpu"
    assert main(["train", "-e", str(spec), f"results_dir={results}", "dataset.batch_size=8",
                 "ray.num_workers=2", "ray.use_gpu=true", "train.num_epochs=2"]) == 0
    assert [line["epoch"] for line in _status(results)] == [1, 2]
    assert load_checkpoint(results / "train/oi_model_latest.pth").epoch == 2


@pytest.mark.slow
def test_one_worker_run_is_reproducible_with_a_seed(spec, tmp_path):
    """With oi-ray's lighting gain too: its draws are seeded like the epoch plan's."""
    states = {}
    for name, gain in (("a", 0.2), ("b", 0.2), ("plain", 0.0)):
        assert _train(spec, tmp_path / name, "train.num_epochs=1", "train.validation_interval=1",
                      f"dataset.augmentation_config.lighting_gain={gain}") == 0
        states[name] = load_checkpoint(tmp_path / name / "train/oi_model_latest.pth").model_state
    for key, value in states["a"].items():
        torch.testing.assert_close(value, states["b"][key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(value, states["plain"][key]) for key, value in states["a"].items()), \
        "the gain changed what the model saw"


def test_bad_resume_checkpoint_fails_before_training(spec, tmp_path, capsys):
    assert _train(spec, tmp_path, "train.resume_training_checkpoint_path=/nonexistent.pth") == 1
    assert "train.resume_training_checkpoint_path='/nonexistent.pth': no such file" in capsys.readouterr().err
    assert _train(spec, tmp_path, "dataset.batch_size=500") == 1
    assert "less than one batch of dataset.batch_size=500" in capsys.readouterr().err
    assert _train(spec, tmp_path, "ray.num_workers=4", "dataset.augmentation_config.augment=true") == 1
    assert "= 4 CPUs leave none of the cluster's 4 for Ray Data's augmentation tasks" in capsys.readouterr().err


def test_ray_workers_reuse_freed_memory_instead_of_faulting_it_in_again(ray_local):
    """The job's workers get the allocator settings: in a thread that is not the main one (as Ray
    Train's training function is), a training step's blocks of over 64 MiB freed by one step are
    reused by the next ones, not handed back to the kernel and faulted in, zeroed, again."""
    import ray

    from oi_ray.runtime import WORKER_ALLOCATOR_ENV

    @ray.remote
    def in_a_worker() -> tuple[dict, list[int]]:
        import resource
        import threading

        faults = []

        def train_steps() -> None:
            torch.set_num_threads(1)
            layers = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                         torch.nn.Conv2d(16, 16, 3, padding=1))
            images = torch.randn(128, 3, 100, 100)  # 82 MB activations
            for _ in range(8):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                layers(images).square().sum().backward()
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

        thread = threading.Thread(target=train_steps)
        thread.start()
        thread.join()
        return {name: os.environ.get(name) for name in WORKER_ALLOCATOR_ENV}, faults

    settings, faults = ray.get(in_a_worker.remote())
    assert settings == {name: os.environ.get(name, value) for name, value in WORKER_ALLOCATOR_ENV.items()}
    # the first step faults its memory in (without the settings, every step does: ~340,000 pages)
    assert faults[0] > 100_000, faults
    # most later steps fault no page in (a step now and then still grows the heap)
    assert statistics.median(faults[2:]) < faults[0] / 10, faults
