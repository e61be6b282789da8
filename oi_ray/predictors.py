"""Scoring backends behind one interface: tiled uint8 picture batches in, pair distances out.

Every consumer (validation during training, ``evaluate``, ``inference``, and later serving)
hands a predictor the ``test`` / ``golden`` columns of a pipeline batch and gets one distance
per pair; larger means more likely a defect. Preprocessing beyond tiling happens inside the
predictor (:class:`InputNormalizer`), so every backend sees exactly the same model input.

Backends by file: ``.pth`` -> torch, ``.onnx`` -> ONNX Runtime (CUDA provider when it really
runs, else CPU), ``.engine`` / ``.trt`` -> TensorRT (NVIDIA GPU and the ``gpu`` extra). ONNX and
TensorRT models output TAO's two embeddings; the distance is the same
:func:`embedding_distance` the torch model uses.
"""

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from oi_ray.checkpoint import load_checkpoint, load_weights
from oi_ray.config.schema import ExperimentConfig
from oi_ray.crypto import unprotect
from oi_ray.data.assemble import InputGeometry
from oi_ray.errors import BackendUnavailableError, DataError
from oi_ray.model.inputs import InputNormalizer
from oi_ray.model.siamese import SiameseNet, build_model, embedding_distance
from oi_ray.model_card import INPUT_NAMES, OUTPUT_NAMES, ModelCard, read_card

log = logging.getLogger(__name__)
ONNX_SUFFIXES = (".onnx",)
TENSORRT_SUFFIXES = (".engine", ".trt", ".plan")
GPU_EXTRA_HINT = "install the gpu extra on a machine with an NVIDIA GPU: pip install -e '.[gpu]'"


class Predictor(Protocol):
    """What every scoring backend offers."""

    threshold: float | None  # the decision threshold the artefact carries (None: unknown)

    def distances(self, test: np.ndarray, golden: np.ndarray) -> np.ndarray:
        """``(B, H', W', 3)`` uint8 test and golden pictures -> ``(B,)`` float32 distances."""
        ...


class TorchPredictor:
    """A :class:`SiameseNet` in eval mode, on ``device``."""

    def __init__(self, model: SiameseNet, geometry: InputGeometry, *, device: torch.device | str = "cpu",
                 threshold: float | None = None, channels_last: bool = False) -> None:
        self.model = model
        self.normalize = InputNormalizer(geometry, device, channels_last=channels_last)
        self.threshold = threshold

    @torch.inference_mode()
    def distances(self, test: np.ndarray, golden: np.ndarray) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        try:
            scores = self.model.distance(self.normalize(test), self.normalize(golden))
        finally:
            self.model.train(was_training)
        return scores.float().cpu().numpy()


def load_torch_predictor(path: str | Path, config: ExperimentConfig,
                         device: torch.device | str = "cpu") -> TorchPredictor:
    """A :class:`TorchPredictor` for the ``.pth`` at ``path``, checked against the spec's model."""
    geometry = InputGeometry.from_config(config.dataset)
    model = build_model(config.model.model_type, geometry.input_shape, config.model.embedding_vectors)
    checkpoint = load_checkpoint(path, config.encryption_key)
    load_weights(model, checkpoint, path, config.model.model_type, geometry.input_shape)
    return TorchPredictor(model.to(device), geometry, device=device, threshold=checkpoint.threshold)


class OnnxPredictor:
    """An exported oi-ray / TAO ONNX model on ONNX Runtime."""

    def __init__(self, model_bytes: bytes, geometry: InputGeometry, *, threshold: float | None,
                 use_gpu: bool = False, source: str | Path = "model") -> None:
        import onnxruntime as ort

        wanted = ["CPUExecutionProvider"]
        if use_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
            wanted.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(model_bytes, providers=wanted)
        except Exception as error:  # onnxruntime raises its own pybind classes (Fail, InvalidProtobuf...)
            raise DataError(f"cannot load ONNX model {source}: {str(error).strip()}") from None
        # onnxruntime-gpu lists CUDA even without a usable GPU and silently falls back: say so.
        self.providers = self.session.get_providers()
        if use_gpu and "CUDAExecutionProvider" not in self.providers:
            log.warning("%s: ONNX Runtime runs on CPU (no usable CUDA provider)", source)
        shape = tuple(self.session.get_inputs()[0].shape[1:])
        if shape != geometry.input_shape:
            raise DataError(f"{source} takes inputs of {shape}, the spec assembles {geometry.input_shape}")
        self.normalize = InputNormalizer(geometry)
        self.threshold = threshold

    def distances(self, test: np.ndarray, golden: np.ndarray) -> np.ndarray:
        first, second = self.session.run(list(OUTPUT_NAMES), dict(zip(
            INPUT_NAMES, (self.normalize(test).numpy(), self.normalize(golden).numpy()), strict=True)))
        return embedding_distance(torch.from_numpy(first), torch.from_numpy(second)).numpy()


class TensorRTPredictor:
    """A serialized TensorRT engine built by ``oi-ray gen_trt_engine`` (CUDA only)."""

    def __init__(self, engine_bytes: bytes, geometry: InputGeometry, *, threshold: float | None,
                 source: str | Path = "engine") -> None:
        trt = import_tensorrt()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise DataError(f"{source} is not a TensorRT engine for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        self.normalize = InputNormalizer(geometry, "cuda")
        self.threshold = threshold
        self.embedding_dim = self.engine.get_tensor_shape(OUTPUT_NAMES[0])[-1]

    def distances(self, test: np.ndarray, golden: np.ndarray) -> np.ndarray:
        inputs = dict(zip(INPUT_NAMES, (self.normalize(test), self.normalize(golden)), strict=True))
        batch = len(test)
        outputs = {name: torch.empty(batch, self.embedding_dim, device="cuda") for name in OUTPUT_NAMES}
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
        for name, tensor in {**inputs, **outputs}.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return embedding_distance(*outputs.values()).float().cpu().numpy()


def import_tensorrt():
    """The ``tensorrt`` module, or one clear error saying what is missing."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"TensorRT needs an NVIDIA GPU with CUDA and none is visible; {GPU_EXTRA_HINT}")
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(f"the tensorrt package is not installed; {GPU_EXTRA_HINT}") from None
    return tensorrt


def checked_threshold(path: str | Path, config: ExperimentConfig) -> float | None:
    """Check that the model file fits the spec and loads (on the CPU; a TensorRT engine only by
    its model card, as it needs a GPU) and return the decision threshold it carries."""
    path = Path(path)
    if is_tensorrt_file(path):
        return _checked_card(path, config).threshold
    return load_predictor(path, config).threshold


def load_predictor(path: str | Path, config: ExperimentConfig, use_gpu: bool = False) -> Predictor:
    """The predictor for ``path`` by its suffix, checked against the spec's model and input layout."""
    path = Path(path)
    if path.suffix == ".pth":
        return load_torch_predictor(path, config, "cuda" if use_gpu else "cpu")
    card = _checked_card(path, config)
    geometry = InputGeometry.from_config(config.dataset)
    payload = unprotect(path.read_bytes(), config.encryption_key, path)
    if path.suffix in ONNX_SUFFIXES:
        return OnnxPredictor(payload, geometry, threshold=card.threshold, use_gpu=use_gpu, source=path)
    return TensorRTPredictor(payload, geometry, threshold=card.threshold, source=path)


def is_tensorrt_file(path: str | Path) -> bool:
    """Whether ``path`` names a TensorRT engine."""
    return Path(path).suffix in TENSORRT_SUFFIXES


def _checked_card(path: Path, config: ExperimentConfig) -> ModelCard:
    if path.suffix not in ONNX_SUFFIXES + TENSORRT_SUFFIXES:
        raise DataError(f"{path}: unknown model file type; expected .pth, .onnx or .engine")
    if not path.is_file():
        raise DataError(f"model not found: {path}")
    card = read_card(path)
    card.check_matches(config, path)
    if card.batch_size > 0:  # a trace with a fixed batch cannot take a split's last, smaller batch
        raise DataError(f"{path} was exported with a fixed batch of {card.batch_size}; scoring needs the "
                        f"dynamic batch axis: export again with export.batch_size=-1")
    return card
