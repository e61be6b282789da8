"""Checkpoints: round trip, atomic streamed writes, memory-mapped loads, encryption at rest, and
TAO checkpoints read without running pickles."""

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from helpers import tao_architecture

from oi_ray.checkpoint import Checkpoint, check_fits, load_checkpoint, restore_model, save_checkpoint
from oi_ray.crypto import MAGIC, SCRYPT_COST
from oi_ray.errors import DataError


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
    model = tao_architecture("Siamese_3", (3, 16, 8), 5).build()
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
    model = tao_architecture("Siamese_3", (3, 16, 8), 5).build()
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
    fresh = tao_architecture("Siamese_3", (3, 16, 8), 5).build()
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


def _mapping_of(tensor: torch.Tensor) -> str | None:
    """The file the memory behind ``tensor`` is mapped from (``/proc/self/maps``), if any."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(bound, 16) for bound in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) == 6 else None
    return None


def _saved_model(folder: Path, key: str | None = None) -> tuple[torch.nn.Module, Path]:
    model = tao_architecture("Siamese_1", (3, 16, 8), 5).build()
    path = folder / "model.pth"
    save_checkpoint(Checkpoint(model.state_dict(), epoch=2, model_type="Siamese_1", input_shape=(3, 16, 8),
                               embedding_dim=5), path, key)
    return model, path


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_plain_checkpoints_are_mapped_and_encrypted_ones_decrypted_once_into_memory(tmp_path):
    model, path = _saved_model(tmp_path)
    restored = restore_model(load_checkpoint(path), path, tao_architecture("Siamese_1", (3, 16, 8), 5))
    weight = restored.fc1[0].weight
    assert _mapping_of(weight) == str(path), "the weights are the file's pages, not a copy"
    assert weight.device.type == "cpu" and weight.requires_grad and isinstance(weight, torch.nn.Parameter)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)

    model, encrypted = _saved_model(tmp_path / "enc", key="k")
    weight = load_checkpoint(encrypted, "k").model_state["fc1.0.weight"]
    assert (_mapping_of(weight) or "").startswith("/memfd:oi-ray-model.pth"), "decrypted in memory only"
    assert torch.equal(weight, model.fc1[0].weight)


def test_encrypted_format_is_one_shot_aes_gcm(tmp_path):
    """Files stream through the encrypting writer but stay MAGIC | salt | nonce | ciphertext+tag,
    so files written by earlier oi-ray versions (one AESGCM call) load, and vice versa."""
    model, path = _saved_model(tmp_path, key="pass phrase")
    data = path.read_bytes()
    salt, nonce = data[len(MAGIC):len(MAGIC) + 16], data[len(MAGIC) + 16:len(MAGIC) + 28]
    key = Scrypt(salt=salt, length=32, n=SCRYPT_COST, r=8, p=1).derive(b"pass phrase")
    plain = AESGCM(key).decrypt(nonce, data[len(MAGIC) + 28:], MAGIC)
    assert torch.equal(torch.load(io.BytesIO(plain))["state_dict"]["fc1.0.weight"], model.fc1[0].weight)

    older = tmp_path / "older.pth"
    salt, nonce = os.urandom(16), os.urandom(12)
    key = Scrypt(salt=salt, length=32, n=SCRYPT_COST, r=8, p=1).derive(b"pass phrase")
    older.write_bytes(MAGIC + salt + nonce + AESGCM(key).encrypt(nonce, plain, MAGIC))
    assert load_checkpoint(older, "pass phrase").epoch == 2
    older.write_bytes(older.read_bytes()[:-1])
    with pytest.raises(DataError, match="wrong encryption_key, or the file was modified"):
        load_checkpoint(older, "pass phrase")


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    _, path = _saved_model(tmp_path, key="k")
    before = path.read_bytes()
    broken = Checkpoint(tao_architecture("Siamese_1", (3, 16, 8), 5).build().state_dict(),
                        extra={"bad": lambda: None})
    with pytest.raises(Exception, match="lambda"):  # pickling fails after the weights were streamed out
        save_checkpoint(broken, path, "k")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_shapes_are_checked_against_a_model_that_is_never_allocated(tmp_path):
    _, path = _saved_model(tmp_path)
    checkpoint = load_checkpoint(path)
    check_fits(checkpoint, path, tao_architecture("Siamese_1", (3, 16, 8), 5))
    with pytest.raises(DataError, match=r"holds a Siamese_1 model with input 3x16x8; the spec asks for "
                                        r"model.model_type=Siamese_1 with input 3x32x8"):
        check_fits(checkpoint, path, tao_architecture("Siamese_1", (3, 32, 8), 5))
    checkpoint.model_type = None  # a TAO checkpoint: only the tensors tell
    with pytest.raises(DataError, match=r"does not fit model.model_type=Siamese_1 with input 3x16x8: "
                                        r"fc1.4.weight: \(5, 500\) in the file, \(7, 500\) expected, fc1.4.bias"):
        check_fits(checkpoint, path, tao_architecture("Siamese_1", (3, 16, 8), 7))
