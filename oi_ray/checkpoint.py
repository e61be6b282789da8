"""``.pth`` checkpoints: oi-ray's own (atomic writes) and TAO's, read without running pickles.

An oi-ray checkpoint is a plain dict of tensors and primitives: model weights, optimizer
state, epoch, the resolved spec (YAML text), the calibrated threshold and the model's
identity. It loads with ``torch.load(weights_only=True)``.

TAO writes Lightning checkpoints whose ``state_dict`` keys carry a ``model.`` prefix and
whose other entries pickle arbitrary objects (configs, callbacks) that PyTorch >= 2.6 refuses
under ``weights_only=True``. Those are read with an unpickler that resolves only tensor
rebuild functions and replaces every other class or function by an inert stub, so nothing
from the file is ever called; only the tensors are used.

Memory: a checkpoint streams to disk while ``torch.save`` writes it (through the encrypting
writer when there is a key), and plain files load memory-mapped, so reading one costs only the
pages actually used: checking shapes or reading the epoch touches none of the weights.
Encrypted files are decrypted once into memory and mapped from there.
"""

import io
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oi_ray.crypto import plain_source, protected_output
from oi_ray.errors import DataError
from oi_ray.fileio import atomic_output
from oi_ray.model.registry import Architecture, describe_model
from oi_ray.storage import cached_copy

FORMAT = "oi-ray/1"
TAO_MODEL_PREFIX = "model."
LATEST_NAME = "oi_model_latest.pth"  # TAO's name for the newest checkpoint


@dataclass
class Checkpoint:
    """What a checkpoint holds; TAO checkpoints fill only ``model_state`` (and ``epoch``)."""

    model_state: dict[str, torch.Tensor]
    epoch: int = 0  # epochs completed
    optimizer_state: dict[str, Any] | None = None
    config_yaml: str | None = None  # the resolved spec the run used
    threshold: float | None = None  # calibrated decision threshold
    threshold_rule: str | None = None  # how it was calibrated (train.calibration, in words)
    model_type: str | None = None
    input_shape: tuple[int, int, int] | None = None
    embedding_dim: int | None = None
    model_options: dict[str, int] = field(default_factory=dict)  # the model type's own (SiameseSpatial)
    extra: dict[str, Any] = field(default_factory=dict)  # metrics and other primitives

    def architecture_text(self) -> str:
        """What the file says it holds, e.g. ``a Siamese_3 model with input 3x64x32``."""
        return describe_model(self.model_type or "unknown", tuple(self.input_shape or ()), self.model_options,
                              as_noun=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "state_dict": self.model_state,
            "epoch": self.epoch,
            "optimizer": self.optimizer_state,
            "config": self.config_yaml,
            "threshold": self.threshold,
            "threshold_rule": self.threshold_rule,
            "model_type": self.model_type,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "embedding_dim": self.embedding_dim,
            "model_options": self.model_options,
            "extra": self.extra,
        }


def save_checkpoint(checkpoint: Checkpoint, path: str | Path, key: str | None = None) -> None:
    """Write ``checkpoint`` atomically (temp file, then rename); encrypted when ``key`` is set."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as out, protected_output(out, key) as sink:
        torch.save(checkpoint.to_dict(), sink)


def epoch_checkpoint_name(epochs_done: int) -> str:
    """``model_epoch_NNN.pth``, the name of the checkpoint taken after ``epochs_done`` epochs.

    NNN counts epochs from 0 as TAO's documentation lists them: the first epoch's file is
    ``model_epoch_000.pth``, the fifth's ``model_epoch_004.pth``.
    """
    return f"model_epoch_{epochs_done - 1:03d}.pth"


def epoch_checkpoint_path(results_dir: str | Path, epochs_done: int) -> Path:
    """The local path of :func:`epoch_checkpoint_name` in ``results_dir``."""
    return Path(results_dir) / epoch_checkpoint_name(epochs_done)


def point_latest_to(checkpoint_path: Path) -> Path:
    """Atomically make ``oi_model_latest.pth`` (same folder) a relative link to ``checkpoint_path``."""
    latest = checkpoint_path.parent / LATEST_NAME
    staging = latest.with_name(f".{LATEST_NAME}.{os.getpid()}.tmp")  # removed if a kill strands it
    staging.unlink(missing_ok=True)
    staging.symlink_to(checkpoint_path.name)
    os.replace(staging, latest)
    return latest


def load_weights(model: torch.nn.Module, checkpoint: Checkpoint, source: str | Path,
                 architecture: Architecture, *, assign: bool = False) -> None:
    """Load ``checkpoint``'s weights into ``model`` (built as ``architecture``) or say why they do
    not fit it. ``assign=True`` makes the checkpoint's tensors the model's own (no copy; the way
    to fill a model built on the ``meta`` device)."""
    _check_fit(model.state_dict(), checkpoint, source, architecture)
    model.load_state_dict(checkpoint.model_state, assign=assign)


def check_fits(checkpoint: Checkpoint, source: str | Path, architecture: Architecture) -> None:
    """Say why ``checkpoint``'s weights do not fit the spec's model, if they do not; the model
    is built on the ``meta`` device (shapes only), so nothing is allocated for its weights."""
    with torch.device("meta"):
        model = architecture.build()
    _check_fit(model.state_dict(), checkpoint, source, architecture)


def restore_model(checkpoint: Checkpoint, source: str | Path, architecture: Architecture) -> torch.nn.Module:
    """The spec's model holding ``checkpoint``'s weights: built on the ``meta`` device and given
    the loaded tensors themselves, so the weights exist once (memory-mapped from a plain file)."""
    with torch.device("meta"):
        model = architecture.build()
    load_weights(model, checkpoint, source, architecture, assign=True)
    return model


def _check_fit(expected: dict[str, torch.Tensor], checkpoint: Checkpoint, source: str | Path,
               architecture: Architecture) -> None:
    wanted = f"model.model_type={architecture.describe()}"
    if checkpoint.model_type is not None and (
            checkpoint.model_type, tuple(checkpoint.input_shape or ()), checkpoint.model_options) != (
            architecture.model_type, tuple(architecture.input_shape), architecture.options):
        raise DataError(f"checkpoint {source} holds {checkpoint.architecture_text()}; "
                        f"the spec asks for {wanted}")
    problems = sorted(set(expected) ^ set(checkpoint.model_state))
    problems += [f"{key}: {tuple(value.shape)} in the file, {tuple(expected[key].shape)} expected"
                 for key, value in checkpoint.model_state.items()
                 if key in expected and value.shape != expected[key].shape]
    if problems:
        shown = ", ".join(problems[:4]) + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")
        raise DataError(f"checkpoint {source} does not fit {wanted}: {shown}")


def load_checkpoint(path: str | Path, key: str | None = None) -> Checkpoint:
    """Read an oi-ray or TAO ``.pth`` without executing pickled code (decrypting with ``key``);
    one in a bucket from its local copy (:func:`~oi_ray.storage.cached_copy`)."""
    path = cached_copy(str(path))
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    with plain_source(path, key) as source:
        # Zip-format files (every torch.save since 1.6) map instead of reading every tensor.
        mmap = not isinstance(source, io.BytesIO) and zipfile.is_zipfile(source)
        try:
            data = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            data = _load_tensors_only(path, source, mmap)
        except (RuntimeError, EOFError, OSError) as error:
            raise DataError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise DataError(f"{path} is not a model checkpoint (no state_dict)")
    if data.get("format") == FORMAT:
        shape = data.get("input_shape")
        return Checkpoint(
            model_state=data["state_dict"], epoch=int(data.get("epoch") or 0),
            optimizer_state=data.get("optimizer"), config_yaml=data.get("config"),
            threshold=data.get("threshold"), threshold_rule=data.get("threshold_rule"),
            model_type=data.get("model_type"),
            input_shape=tuple(shape) if shape else None, embedding_dim=data.get("embedding_dim"),
            model_options=data.get("model_options") or {}, extra=data.get("extra") or {},
        )
    return _from_tao(data)


def _from_tao(data: dict[str, Any]) -> Checkpoint:
    """Keep TAO's model tensors (``model.`` prefix stripped) and how many epochs it completed.

    Lightning stores the 0-based index of the epoch that just ended (``model_epoch_004`` holds
    ``epoch: 4`` after five epochs), so the completed count is that index plus one.
    """
    state = {key.removeprefix(TAO_MODEL_PREFIX): value for key, value in data["state_dict"].items()
             if isinstance(value, torch.Tensor)}
    epoch = data.get("epoch")
    return Checkpoint(model_state=state, epoch=epoch + 1 if isinstance(epoch, int) else 0)


class _Stub:
    """Stands in for any class or function a checkpoint names but oi-ray does not trust."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Stub":
        return _Stub()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


_TRUSTED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.storage", "UntypedStorage"),
}


class _TensorsOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        storage_or_dtype = module == "torch" and (
            name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype))
        if (module, name) in _TRUSTED or storage_or_dtype:
            return super().find_class(module, name)
        return _Stub


class _TensorsOnlyPickle:
    """A ``pickle_module`` for ``torch.load`` whose unpickler never resolves untrusted names."""

    Unpickler = _TensorsOnlyUnpickler
    load = staticmethod(pickle.load)
    __name__ = "oi_ray_tensors_only_pickle"


def _load_tensors_only(path: Path, source: Path | io.BytesIO, mmap: bool) -> Any:
    if isinstance(source, io.BytesIO):
        source.seek(0)
    try:
        return torch.load(source, map_location="cpu", weights_only=False, mmap=mmap,
                          pickle_module=_TensorsOnlyPickle)
    except Exception as error:  # any failure here means the file is not a usable checkpoint
        raise DataError(f"cannot read checkpoint {path}: {error}") from None
