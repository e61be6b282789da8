"""The model a service scores with: found, checked and described before anything starts.

An exported ONNX model or TensorRT engine brings its model card, which is the authority on
the input layout and the calibrated threshold: the spec needs no dataset section. A ``.pth``
has no card; one is described from the spec's model and dataset sections after the
checkpoint's tensors are checked against them.
"""

from dataclasses import dataclass
from pathlib import Path

from oi_ray import __version__
from oi_ray.checkpoint import check_fits, load_checkpoint
from oi_ray.config.schema import ExperimentConfig
from oi_ray.decision import CarriedThreshold
from oi_ray.errors import BackendUnavailableError, DataError
from oi_ray.fileio import sha256_of
from oi_ray.model.registry import Architecture
from oi_ray.model_card import ModelCard, card_path, export_destination, read_card
from oi_ray.predictors import (
    ONNX_SUFFIXES,
    TENSORRT_SUFFIXES,
    Predictor,
    check_model_file,
    predictor_for_card,
)

BACKENDS = {".pth": "torch", **dict.fromkeys(ONNX_SUFFIXES, "onnxruntime"),
            **dict.fromkeys(TENSORRT_SUFFIXES, "tensorrt")}


@dataclass(frozen=True)
class ServedModel:
    """A checked model file, its card, and the threshold it carries."""

    path: Path
    card: ModelCard
    carried: CarriedThreshold
    encryption_key: str | None

    @property
    def backend(self) -> str:
        """``onnxruntime``, ``tensorrt`` or ``torch``."""
        return BACKENDS[self.path.suffix]

    @property
    def name(self) -> str:
        """File name and the first 12 hex digits of its SHA-256: which model answered."""
        digest = self.card.model_sha256 or self.card.source_checkpoint_sha256
        return f"{self.path.name}@{digest[:12]}"

    def load(self, use_gpu: bool, threads: int | None) -> Predictor:
        """The predictor (in the process that scores)."""
        return predictor_for_card(self.path, self.card, self.encryption_key, use_gpu, threads=threads)


def served_model_path(config: ExperimentConfig) -> Path:
    """``serve.model``, else the ONNX model ``oi-ray export`` writes for this spec."""
    return Path(config.serve.model).resolve() if config.serve.model else export_destination(config.export)


def resolve_served_model(config: ExperimentConfig) -> ServedModel:
    """Find and check the model ``config`` serves, without loading it; clear errors for a
    missing, unknown, corrupt or undecryptable file and for an engine without GPUs."""
    path = served_model_path(config)
    key = config.encryption_key
    if path.suffix not in BACKENDS:
        raise DataError(f"serve.model={str(path)!r}: unknown model file type; "
                        f"expected .onnx, .engine or .pth")
    if not path.is_file():
        hint = "" if config.serve.model else " (serve.model is not set: this is where `oi-ray export` writes)"
        raise DataError(f"model not found: {path}{hint}; export one with `oi-ray export -e SPEC` "
                        f"or set serve.model")
    if path.suffix in TENSORRT_SUFFIXES and config.serve.num_gpus <= 0:
        raise BackendUnavailableError(f"{path} is a TensorRT engine, which runs on a GPU: set serve.num_gpus "
                                      f"(e.g. 1, or 0.5 to share one), or serve the .onnx model")
    if path.suffix != ".pth":
        card = read_card(path)
        check_model_file(path, card, key)
        carried = CarriedThreshold(card.threshold, f"the model card {card_path(path)}", card.threshold_rule)
        return ServedModel(path, card, carried, key)
    checkpoint = load_checkpoint(path, key)
    check_fits(checkpoint, path, Architecture.of_spec(config))
    card = ModelCard.describe(config, checkpoint.threshold, threshold_rule=checkpoint.threshold_rule,
                              batch_size=-1, opset_version=None,
                              oi_ray_version=__version__, source_checkpoint=str(path),
                              source_checkpoint_sha256=sha256_of(path))
    carried = CarriedThreshold(checkpoint.threshold, f"the checkpoint {path}", checkpoint.threshold_rule)
    return ServedModel(path, card, carried, key)
