"""The model a service scores with: found, checked and described before anything starts.

An exported ONNX model or TensorRT engine brings its model card, which is the authority on
the input layout and the calibrated threshold: the spec needs no dataset section. A ``.pth``
has no card; one is described from the spec's model and dataset sections after the
checkpoint's tensors are checked against them.
"""

from pathlib import Path

from oi_ray import storage
from oi_ray.config.schema import ExperimentConfig
from oi_ray.errors import BackendUnavailableError, DataError
from oi_ray.model_card import ModelCard, export_destination
from oi_ray.model_file import BACKENDS, ModelFile, open_model_file
from oi_ray.predictors import TENSORRT_SUFFIXES, check_halves


def served_model_path(config: ExperimentConfig) -> str:
    """``serve.model`` (an absolute path, or a URI), else the ONNX model ``oi-ray export`` writes
    for this spec."""
    if not config.serve.model:
        return export_destination(config.export)
    model = config.serve.model
    return model if storage.is_uri(model) else str(Path(storage.local_path(model)).resolve())


def resolve_served_model(config: ExperimentConfig) -> ModelFile:
    """Find and check the model ``config`` serves, without loading it; clear errors for a
    missing, unknown, corrupt or undecryptable file and for an engine without GPUs. A model in a
    bucket is served from a local copy (:func:`~oi_ray.storage.cached_copy`)."""
    path = served_model_path(config)
    suffix = Path(storage.name(path)).suffix
    if suffix not in BACKENDS:
        raise DataError(f"serve.model={path!r}: unknown model file type; "
                        f"expected .onnx, .engine or .pth")
    if storage.file_size(path) is None:
        hint = "" if config.serve.model else " (serve.model is not set: this is where `oi-ray export` writes)"
        raise DataError(f"model not found: {path}{hint}; export one with `oi-ray export -e SPEC` "
                        f"or set serve.model")
    if suffix in TENSORRT_SUFFIXES and config.serve.num_gpus <= 0:
        raise BackendUnavailableError(f"{path} is a TensorRT engine, which runs on a GPU: set serve.num_gpus "
                                      f"(e.g. 1, or 0.5 to share one), or serve the .onnx model")
    expected = ModelCard.expected_by(config) if suffix == ".pth" else None
    model = open_model_file(path, config.encryption_key, expected, checkpoint_digest=True)
    if config.serve.golden_store is not None:
        _check_halves(model)
    return model


def _check_halves(model: ModelFile) -> None:
    """A golden library scores with the model's two halves: checked before any replica starts."""
    try:
        check_halves(model.path, model.card)
    except (DataError, BackendUnavailableError) as error:
        raise type(error)(f"serve.golden_store: {error}") from None
