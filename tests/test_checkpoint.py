"""Checkpoints: round trip, atomic writes, and TAO checkpoints read without running pickles."""

import os
import pickle

import pytest
import torch

from oi_ray.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from oi_ray.errors import DataError
from oi_ray.model.siamese import build_model


class _Exploit:
    """Pickles to a call of os.system: loading it must not run the command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class HyperParameters:
    """Stands for the config objects TAO's Lightning checkpoints pickle."""

    def __init__(self):
        self.model_type = "Siamese_3"


def test_round_trip_keeps_everything(tmp_path):
    model = build_model("Siamese_3", (3, 16, 8), 5)
    optimizer = torch.optim.Adam(model.parameters())
    model.distance(torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8)).sum().backward()
    optimizer.step()
    checkpoint = Checkpoint(model_state=model.state_dict(), epoch=3, optimizer_state=optimizer.state_dict(),
                            config_yaml="model:\n  margin: 2.0\n", threshold=1.25, model_type="Siamese_3",
                            input_shape=(3, 16, 8), embedding_dim=5, extra={"val_auroc": 0.9})
    path = tmp_path / "model_epoch_003.pth"
    save_checkpoint(checkpoint, path)
    assert [p.name for p in tmp_path.iterdir()] == ["model_epoch_003.pth"], "no temp files left"
    torch.load(path, weights_only=True)  # plain tensors and primitives only
    loaded = load_checkpoint(path)
    assert (loaded.epoch, loaded.threshold, loaded.model_type) == (3, 1.25, "Siamese_3")
    assert loaded.input_shape == (3, 16, 8) and loaded.embedding_dim == 5
    assert loaded.extra == {"val_auroc": 0.9}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model_state[key], value)
    restored = torch.optim.Adam(model.parameters())
    restored.load_state_dict(loaded.optimizer_state)


def test_tao_lightning_checkpoint_loads_weights_without_running_code(tmp_path):
    model = build_model("Siamese_3", (3, 16, 8), 5)
    marker = tmp_path / "pwned"
    tao = {
        "epoch": 4,
        "state_dict": {f"model.{key}": value for key, value in model.state_dict().items()},
        "hyper_parameters": HyperParameters(),
        "callbacks": _Exploit(marker),
    }
    path = tmp_path / "oi_model_epoch=004.pth"
    torch.save(tao, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what PyTorch >= 2.6 does by default
    loaded = load_checkpoint(path)
    assert not marker.exists(), "the pickled os.system call must not run"
    assert loaded.epoch == 5 and loaded.threshold is None, "Lightning's epoch 4 is the fifth epoch done"
    fresh = build_model("Siamese_3", (3, 16, 8), 5)
    fresh.load_state_dict(loaded.model_state)
    assert torch.equal(fresh.fc1[0].weight, model.fc1[0].weight)


def test_missing_and_broken_checkpoints(tmp_path):
    with pytest.raises(DataError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "oi_model_lastest.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=f"cannot read checkpoint {junk}"):
        load_checkpoint(junk)
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(DataError, match="is not a model checkpoint"):
        load_checkpoint(other)
