"""Scoring backends behind one interface: tiled uint8 picture batches in, pair distances out.

Every consumer (validation during training, ``evaluate``, ``inference``, and later serving)
hands a predictor the ``test`` / ``golden`` columns of a pipeline batch and gets one distance
per pair; larger means more likely a defect. Preprocessing beyond tiling happens inside the
predictor (:class:`InputNormalizer`), so every backend sees exactly the same model input.

Backends by file: ``.pth`` -> torch, ``.onnx`` -> ONNX Runtime (CUDA provider when it really
runs, else CPU), ``.engine`` / ``.trt`` -> TensorRT (NVIDIA GPU and the ``gpu`` extra). ONNX and
TensorRT models output what their model card names: TAO's two embeddings (the distance is the
same L2 distance the torch model computes) or SiameseSpatial's distance itself. A model that
takes only some batch sizes (an ONNX export with a fixed batch, a TensorRT profile) gets
batches cut and padded to fit by :class:`BatchLimits`, the same code for every backend, so any
batch size scores.

:func:`load_predictor` is the one factory: a model file, its card and a device. The driver
checks the file first, without loading it (``oi_ray.model_file``).
"""

import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from oi_ray.checkpoint import load_checkpoint, restore_model
from oi_ray.crypto import is_encrypted_file, read_plain
from oi_ray.data.assemble import InputGeometry
from oi_ray.errors import BackendUnavailableError, DataError
from oi_ray.fileio import sha256_of
from oi_ray.model.folding import fold_batch_norms
from oi_ray.model.inputs import InputNormalizer
from oi_ray.model.parts import COMPARE, COMPARE_INPUTS, EMBED, EMBED_INPUTS
from oi_ray.model.registry import EMBEDDING_OUTPUTS, distance_from_outputs
from oi_ray.model_card import INPUT_NAMES, ModelCard

log = logging.getLogger(__name__)
ONNX_SUFFIXES = (".onnx",)
TENSORRT_SUFFIXES = (".engine", ".trt", ".plan")
GPU_EXTRA_HINT = "install the gpu extra on a machine with an NVIDIA GPU: pip install -e '.[gpu]'"
# Features per side in one call of a compare half on CPU: the comparison's temporaries (a
# distance map per shift of SiameseSpatial's window) then stay in a core's cache, and the
# chunks run on every core at once (SiameseSpatial, 32 pairs of 4 tiles, 2 cores: 22 ms in
# chunks of one pair against 66 ms as one call with 2 intra-op threads; benchmarks/RESULTS.md).
COMPARE_CHUNK_BYTES = 2**20


class Predictor(Protocol):
    """What every scoring backend offers."""

    threshold: float | None  # the decision threshold the artefact carries (None: unknown)

    def distances(self, test: np.ndarray, golden: np.ndarray) -> np.ndarray:
        """``(B, H', W', 3)`` uint8 test and golden pictures -> ``(B,)`` float32 distances, any B."""
        ...


class HalvesPredictor(Protocol):
    """A model scored in its two halves (``oi_ray.model.parts``): a golden's features are
    computed once and compared with many test shots."""

    def embed(self, pictures: np.ndarray) -> np.ndarray:
        """``(B, H', W', 3)`` uint8 pictures of one side -> their float32 features
        (``B`` times the card's ``features_per_pair`` first axis)."""
        ...

    def compare(self, test_features: np.ndarray, golden_features: np.ndarray) -> np.ndarray:
        """Two sides' features, pair by pair -> ``(B,)`` float32 distances."""
        ...


@dataclass(frozen=True)
class BatchLimits:
    """The batch sizes a model takes: ``smallest`` to ``largest`` (None: no upper limit)."""

    smallest: int = 1
    largest: int | None = None

    def score(self, run: Callable[..., np.ndarray], *sides: np.ndarray) -> np.ndarray:
        """``run`` over a batch of any size (``sides``: arrays with one entry per pair along
        their first axis): cut into pieces of at most ``largest`` pairs; a piece smaller than
        ``smallest`` is padded with copies of its last pair, whose results are dropped (each
        pair's result depends on that pair alone)."""
        total = len(sides[0])
        step = self.largest or max(total, 1)
        pieces = []
        for start in range(0, total, step):
            piece = tuple(side[start:start + step] for side in sides)
            real = len(piece[0])
            if real < self.smallest:
                piece = tuple(_padded(side, self.smallest) for side in piece)
            pieces.append(np.asarray(run(*piece), dtype=np.float32)[:real])
        return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


def _padded(pictures: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([pictures, np.repeat(pictures[-1:], size - len(pictures), axis=0)])


class TorchPredictor:
    """A model (any :class:`Architecture`) in eval mode, on ``device``."""

    limits = BatchLimits()

    def __init__(self, model: torch.nn.Module, geometry: InputGeometry, *, device: torch.device | str = "cpu",
                 threshold: float | None = None, channels_last: bool = False) -> None:
        self.model = model
        self.normalize = InputNormalizer(geometry, device, channels_last=channels_last)
        self.threshold = threshold

    def distances(self, test: np.ndarray, golden: np.ndarray) -> np.ndarray:
        return self.limits.score(self._run, test, golden)

    @torch.inference_mode()
    def _run(self, test: np.ndarray, golden: np.ndarray) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        try:
            scores = self.model.distance(self.normalize(test), self.normalize(golden))
        finally:
            self.model.train(was_training)
        return scores.float().cpu().numpy()

    @torch.inference_mode()
    def embed(self, pictures: np.ndarray) -> np.ndarray:
        """One side's features (:class:`HalvesPredictor`); the model is in eval mode."""
        return self.model.eval().embed(self.normalize(pictures)).float().cpu().numpy()

    @torch.inference_mode()
    def compare(self, test_features: np.ndarray, golden_features: np.ndarray) -> np.ndarray:
        """Distances of two sides' features (:class:`HalvesPredictor`)."""
        device = self.normalize.device
        return self.model.eval().compare(torch.from_numpy(test_features).to(device),
                                         torch.from_numpy(golden_features).to(device)).float().cpu().numpy()


def onnx_session(model: bytes | str | Path, *, use_gpu: bool = False, source: str | Path = "model",
                 threads: int | None = None):
    """An ONNX Runtime session of ``model`` (a path or the graph's bytes): the CUDA provider when
    ``use_gpu`` and it really runs (a warning otherwise), ``threads`` intra-op threads (default
    one per core), idle threads asleep; a clear error for a file ONNX Runtime cannot load."""
    import onnxruntime as ort

    wanted = ["CPUExecutionProvider"]
    if use_gpu and onnxruntime_has_cuda():
        wanted.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default, one per core
    # Idle threads sleep instead of spinning: the cores are shared with decoding, Ray and HTTP
    # (measured: no slower at batch 1 or 32, and served latency drops).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                       sess_options=options, providers=wanted)
    except Exception as error:  # onnxruntime raises its own pybind classes (Fail, InvalidProtobuf...)
        raise DataError(f"cannot load ONNX model {source}: {str(error).strip()}") from None
    # onnxruntime-gpu lists CUDA even without a usable GPU and silently falls back: say so.
    if use_gpu and "CUDAExecutionProvider" not in session.get_providers():
        log.warning("%s: ONNX Runtime runs on CPU (no usable CUDA provider)", source)
    return session


def _check_takes_pictures(session, geometry: InputGeometry, source: str | Path) -> None:
    shape = tuple(session.get_inputs()[0].shape[1:])
    if shape != geometry.input_shape:
        raise DataError(f"{source} takes inputs of {shape}, the spec assembles {geometry.input_shape}")


class OnnxPredictor:
    """An exported oi-ray / TAO ONNX model on ONNX Runtime, from its path or its bytes."""

    def __init__(self, model: bytes | str | Path, geometry: InputGeometry, *, threshold: float | None,
                 use_gpu: bool = False, source: str | Path = "model", threads: int | None = None,
                 output_names: tuple[str, ...] = EMBEDDING_OUTPUTS) -> None:
        self.session = onnx_session(model, use_gpu=use_gpu, source=source, threads=threads)
        self.providers = self.session.get_providers()
        _check_takes_pictures(self.session, geometry, source)
        batch = self.session.get_inputs()[0].shape[0]
        # A symbolic batch dimension ("batch") takes any size; a number is a fixed batch.
        self.limits = BatchLimits(batch, batch) if isinstance(batch, int) and batch > 0 else BatchLimits()
        self.normalize = InputNormalizer(geometry)
        self.threshold = threshold
        self.output_names = output_names

    def distances(self, test: np.ndarray, golden: np.ndarray) -> np.ndarray:
        return self.limits.score(self._run, test, golden)

    def _run(self, test: np.ndarray, golden: np.ndarray) -> np.ndarray:
        outputs = self.session.run(list(self.output_names), dict(zip(
            INPUT_NAMES, (self.normalize(test).numpy(), self.normalize(golden).numpy()), strict=True)))
        return distance_from_outputs(outputs)


class OnnxHalvesPredictor:
    """The two halves an export writes beside the model (``parts`` in its card), on ONNX Runtime
    (always a dynamic first axis: any batch). On CPU the compare half runs in chunks of about
    :data:`COMPARE_CHUNK_BYTES` of features, on a pool of ``threads`` single-threaded calls."""

    def __init__(self, embed, compare, geometry: InputGeometry, features_per_pair: tuple[int, ...],
                 threads: int | None = None) -> None:
        """``embed``, ``compare``: the halves' ONNX Runtime sessions (:func:`onnx_session`; the
        compare one with 1 intra-op thread on CPU); ``features_per_pair``: the shape of one
        side's features (the model card's); ``threads``: calls at once (default one per core)."""
        self.embed_session, self.compare_session = embed, compare
        self.normalize = InputNormalizer(geometry)
        self.images = embed.get_inputs()[0].name
        self.compare_inputs = [entry.name for entry in compare.get_inputs()]
        self.rows_per_pair = features_per_pair[0]
        side_bytes = math.prod(features_per_pair) * np.dtype(np.float32).itemsize
        self.chunk_pairs = max(1, COMPARE_CHUNK_BYTES // side_bytes)
        on_cpu = compare.get_providers()[0] == "CPUExecutionProvider"
        self.pool = ThreadPoolExecutor(threads or os.cpu_count(), "compare") if on_cpu else None

    def embed(self, pictures: np.ndarray) -> np.ndarray:
        """One side's features (:class:`HalvesPredictor`)."""
        return self.embed_session.run(None, {self.images: self.normalize(pictures).numpy()})[0]

    def compare(self, test_features: np.ndarray, golden_features: np.ndarray) -> np.ndarray:
        """Distances of two sides' features (:class:`HalvesPredictor`)."""
        rows = self.rows_per_pair * self.chunk_pairs
        if self.pool is None or len(test_features) <= rows:
            return self._compare(test_features, golden_features)
        parts = self.pool.map(lambda start: self._compare(test_features[start:start + rows],
                                                          golden_features[start:start + rows]),
                              range(0, len(test_features), rows))
        return np.concatenate(list(parts))

    def _compare(self, test_features: np.ndarray, golden_features: np.ndarray) -> np.ndarray:
        return self.compare_session.run(None, dict(zip(self.compare_inputs, (test_features, golden_features),
                                                       strict=True)))[0]


class TensorRTEngine:
    """A serialized TensorRT engine (CUDA only) run on float32 CUDA tensors."""

    def __init__(self, engine_bytes: bytes, source: str | Path = "engine") -> None:
        trt = import_tensorrt()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise DataError(f"{source} is not a TensorRT engine for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(index) for index in range(self.engine.num_io_tensors)]
        self.output_names = [name for name in names
                             if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT]

    def limits(self, name: str, rows_per_pair: int = 1) -> BatchLimits:
        """The pairs a call takes: the fixed first axis of input ``name``, or its optimisation
        profile's range, over ``rows_per_pair`` entries of that axis per pair."""
        declared = self.engine.get_tensor_shape(name)[0]
        if declared > 0:
            return BatchLimits(declared // rows_per_pair, declared // rows_per_pair)
        smallest, _, largest = self.engine.get_tensor_profile_shape(name, 0)  # min, opt, max of profile 0
        return BatchLimits(max(1, smallest[0] // rows_per_pair), largest[0] // rows_per_pair)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The engine's outputs by name, for its inputs by name."""
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {name: torch.empty(tuple(self.context.get_tensor_shape(name)), device="cuda")
                   for name in self.output_names}
        for name, tensor in outputs.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return outputs


class TensorRTPredictor:
    """A serialized TensorRT engine built by ``oi-ray gen_trt_engine`` (CUDA only)."""

    def __init__(self, engine_bytes: bytes, geometry: InputGeometry, *, threshold: float | None,
                 source: str | Path = "engine", output_names: tuple[str, ...] = EMBEDDING_OUTPUTS) -> None:
        self.engine = TensorRTEngine(engine_bytes, source)
        self.normalize = InputNormalizer(geometry, "cuda")
        self.threshold = threshold
        self.output_names = output_names
        self.limits = self.engine.limits(INPUT_NAMES[0])

    def distances(self, test: np.ndarray, golden: np.ndarray) -> np.ndarray:
        return self.limits.score(self._run, test, golden)

    def _run(self, test: np.ndarray, golden: np.ndarray) -> np.ndarray:
        outputs = self.engine.run(dict(zip(INPUT_NAMES, (self.normalize(test), self.normalize(golden)),
                                           strict=True)))
        return distance_from_outputs([outputs[name] for name in self.output_names])


class TensorRTHalvesPredictor:
    """The engines ``oi-ray gen_trt_engine`` builds of an export's two halves (CUDA only): each
    call cut and padded to the engines' batch limits, as the whole engine's."""

    def __init__(self, embed: TensorRTEngine, compare: TensorRTEngine, geometry: InputGeometry,
                 features_per_pair: tuple[int, ...]) -> None:
        self.embed_engine, self.compare_engine = embed, compare
        self.normalize = InputNormalizer(geometry, "cuda")
        self.rows_per_pair, *self.row_shape = features_per_pair
        self.embed_limits = embed.limits(EMBED_INPUTS[0])
        self.compare_limits = compare.limits(COMPARE_INPUTS[0], self.rows_per_pair)

    def embed(self, pictures: np.ndarray) -> np.ndarray:
        """One side's features (:class:`HalvesPredictor`)."""
        per_pair = self.embed_limits.score(self._embed, pictures)
        return per_pair.reshape(-1, *self.row_shape)

    def compare(self, test_features: np.ndarray, golden_features: np.ndarray) -> np.ndarray:
        """Distances of two sides' features (:class:`HalvesPredictor`)."""
        sides = (features.reshape(-1, self.rows_per_pair, *self.row_shape)
                 for features in (test_features, golden_features))
        return self.compare_limits.score(self._compare, *sides)

    def _embed(self, pictures: np.ndarray) -> np.ndarray:
        features = next(iter(self.embed_engine.run({EMBED_INPUTS[0]: self.normalize(pictures)}).values()))
        return features.reshape(len(pictures), self.rows_per_pair, *self.row_shape).cpu().numpy()

    def _compare(self, test_features: np.ndarray, golden_features: np.ndarray) -> np.ndarray:
        sides = (torch.from_numpy(np.ascontiguousarray(features.reshape(-1, *self.row_shape))).to("cuda")
                 for features in (test_features, golden_features))
        return next(iter(self.compare_engine.run(dict(zip(COMPARE_INPUTS, sides, strict=True))).values())) \
            .cpu().numpy()


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


def load_predictor(path: Path, card: ModelCard, key: str | None, use_gpu: bool = False, *,
                   threads: int | None = None) -> Predictor:
    """The predictor for the model file at ``path`` (decrypted with ``key`` when encrypted), laid
    out as its ``card`` says, on a GPU when ``use_gpu``; ``threads``: ONNX Runtime's intra-op
    threads (default: one per core). The driver opens the file first (``oi_ray.model_file``),
    which checks it and gives a ``.pth`` its card."""
    geometry = card.geometry()
    if path.suffix == ".pth":  # the checkpoint's own tensors (memory-mapped from a plain file), not a copy
        device = "cuda" if use_gpu else "cpu"
        checkpoint = load_checkpoint(path, key)
        model = fold_batch_norms(restore_model(checkpoint, path, card.architecture()).eval())
        return TorchPredictor(model.to(device), geometry, device=device, threshold=checkpoint.threshold)
    if path.suffix in ONNX_SUFFIXES:
        return OnnxPredictor(_onnx_graph(path, key), geometry, threshold=card.threshold, use_gpu=use_gpu,
                             source=path, threads=threads, output_names=card.output_names)
    return TensorRTPredictor(read_plain(path, key), geometry, threshold=card.threshold, source=path,
                             output_names=card.output_names)


def _onnx_graph(path: Path, key: str | None) -> Path | bytes:
    """What ONNX Runtime opens: the path itself (it reads the file), or the decrypted bytes."""
    return read_plain(path, key) if is_encrypted_file(path) else path


def check_halves(path: Path, card: ModelCard) -> dict[str, Path]:
    """The files of the model at ``path`` scored in halves, by half: none for a ``.pth`` (its
    network has them); an export's card must name both, each file present and the one the
    card's SHA-256 describes (checked without loading them, as the driver checks a model)."""
    if path.suffix == ".pth":
        return {}
    if set(card.parts) != {EMBED, COMPARE}:
        made, again = ("built", "build it again (`oi-ray gen_trt_engine`) from an export that has them") \
            if is_tensorrt_file(path) else ("exported", "export it again")
        raise DataError(f"{path} was {made} without its embed and compare halves (an older oi-ray); "
                        f"{again} to score against kept goldens")
    files = {}
    for name, part in card.parts.items():
        part_file = path.with_name(part["file"])
        if not part_file.is_file():
            raise DataError(f"{part_file} is missing: the {name} half of {path.name}, as its model card says")
        if sha256_of(part_file) != part["sha256"]:
            raise DataError(f"{part_file} does not match the model card of {path.name} (SHA-256 differs): "
                            "export the model again")
        files[name] = part_file
    return files


def load_halves_predictor(path: Path, card: ModelCard, key: str | None, use_gpu: bool = False, *,
                          threads: int | None = None) -> HalvesPredictor:
    """The two halves of the model at ``path``: a ``.pth``'s own network, or the ONNX halves or
    TensorRT engines its card names beside it (:func:`check_halves`)."""
    files = check_halves(path, card)
    if not files:
        return load_predictor(path, card, key, use_gpu, threads=threads)
    if is_tensorrt_file(path):
        embed, compare = (TensorRTEngine(read_plain(files[name], key), files[name])
                          for name in (EMBED, COMPARE))
        return TensorRTHalvesPredictor(embed, compare, card.geometry(), card.features_per_pair)
    embed, compare = (onnx_session(_onnx_graph(files[name], key), use_gpu=use_gpu, source=files[name],
                                   threads=threads if name == EMBED else 1) for name in (EMBED, COMPARE))
    _check_takes_pictures(embed, card.geometry(), files[EMBED])
    return OnnxHalvesPredictor(embed, compare, card.geometry(), card.features_per_pair, threads)


def onnxruntime_has_cuda() -> bool:
    """Whether this environment's ONNX Runtime build has the CUDA provider (onnxruntime-gpu)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def is_tensorrt_file(path: str | Path) -> bool:
    """Whether ``path`` names a TensorRT engine."""
    return Path(path).suffix in TENSORRT_SUFFIXES
