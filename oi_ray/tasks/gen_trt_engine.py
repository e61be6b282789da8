"""``oi-ray gen_trt_engine``: an exported ONNX model -> a serialized TensorRT engine (GPU only).

Honours TAO's ``gen_trt_engine`` fields: ``tensorrt.data_type`` fp32 / fp16,
``tensorrt.workspace_size`` in MiB (as documented; TAO itself reads it as GB),
``tensorrt.min/opt/max_batch_size`` as the optimisation profile of the dynamic batch axis (opt
and max default to ``dataset.batch_size`` so the engine takes evaluate's batches; a fixed-batch
ONNX model keeps its batch), ``timing_cache`` (read when the file exists, written after the
build, so rebuilds skip kernel timing) and ``verbose``. The model card is copied beside the
engine with the engine's own SHA-256, so evaluate and inference use it like the ONNX model.

An export's two halves (``oi_model.embed.onnx``, ``oi_model.compare.onnx``) become engines
beside the model's (``oi_model.embed.engine``, ``oi_model.compare.engine``, named in the card)
with the same settings and batch profile (the compare half's in feature rows): a golden library
and a split whose rows share goldens then score on TensorRT from kept golden features.
"""

import dataclasses
import logging
from pathlib import Path

from oi_ray.config import save_resolved_spec
from oi_ray.config.schema import ExperimentConfig, TrtDataType
from oi_ray.crypto import is_encrypted_file, protected_output, read_plain
from oi_ray.errors import ConfigError, DataError
from oi_ray.fileio import atomic_output, sha256_of
from oi_ray.model.parts import COMPARE, COMPARE_INPUTS, EMBED, EMBED_INPUTS
from oi_ray.model_card import INPUT_NAMES, ModelCard, part_path
from oi_ray.model_file import open_model_file
from oi_ray.predictors import ONNX_SUFFIXES, check_halves, import_tensorrt

log = logging.getLogger(__name__)
MIB = 1 << 20


def run(config: ExperimentConfig) -> None:
    """Build ``gen_trt_engine.trt_engine`` from ``gen_trt_engine.onnx_file``, and an engine of
    each of the model's halves beside it when the export has them."""
    section, trt_config = config.gen_trt_engine, config.gen_trt_engine.tensorrt
    if not section.onnx_file:
        raise ConfigError("gen_trt_engine.onnx_file is not set: give the .onnx that `oi-ray export` wrote")
    if trt_config.data_type == TrtDataType.INT8:
        raise ConfigError("gen_trt_engine.tensorrt.data_type='int8' is not supported yet (it needs a "
                          "calibration set); use fp16 or fp32")
    onnx_path = Path(section.onnx_file)
    if onnx_path.suffix not in ONNX_SUFFIXES:
        raise DataError(f"gen_trt_engine.onnx_file={str(onnx_path)!r}: expected the .onnx model "
                        f"that `oi-ray export` wrote")
    card = open_model_file(onnx_path, config.encryption_key, ModelCard.expected_by(config)).card
    half_files = check_halves(onnx_path, card) if card.parts else {}
    profile = _batch_profile(config, card)
    engine_path = Path(section.trt_engine or onnx_path.with_suffix(".engine")).resolve()
    cache_path = Path(section.timing_cache) if section.timing_cache else None
    builder = _EngineBuilder(config, cache_path)

    builder.build(onnx_path, {name: (card.input_shape, 1) for name in INPUT_NAMES}, profile, engine_path)
    parts, half_inputs = {}, _half_inputs(card) if half_files else {}
    for name, half_onnx in half_files.items():
        half_engine = part_path(engine_path, name)
        # the halves always have a dynamic first axis: a fixed-batch model's halves get a profile
        builder.build(half_onnx, half_inputs[name], profile or (card.batch_size,) * 3, half_engine)
        parts[name] = {"file": half_engine.name, "sha256": sha256_of(half_engine)}
    builder.keep_timing_cache()
    dataclasses.replace(card, model_sha256=sha256_of(engine_path), parts=parts).write(engine_path)
    save_resolved_spec(config, section.results_dir)
    batches = f"batch {profile[0]}..{profile[2]}, optimised for {profile[1]}" if profile is not None \
        else f"fixed batch {card.batch_size}"
    halves = f"; its halves {', '.join(part['file'] for part in parts.values())}" if parts else ""
    log.info("wrote %s (%s, %s%s%s)", engine_path, trt_config.data_type, batches, halves,
             f"; timing cache {cache_path}" if cache_path is not None else "")


def _batch_profile(config: ExperimentConfig, card: ModelCard) -> tuple[int, int, int] | None:
    """(min, opt, max) batch of the engine's profile; None for a fixed-batch model.

    ``gen_trt_engine.batch_size`` > 0 fixes the engine's batch (TAO's meaning; -1: the
    ``tensorrt.min/opt/max_batch_size`` profile)."""
    trt_config = config.gen_trt_engine.tensorrt
    explicit_profile = trt_config.opt_batch_size or trt_config.max_batch_size
    if card.batch_size > 0:
        if explicit_profile:
            log.info("the ONNX model has a fixed batch of %d: the engine takes that batch; "
                     "gen_trt_engine.tensorrt.*_batch_size do not apply", card.batch_size)
        return None
    fixed = config.gen_trt_engine.batch_size
    if fixed > 0:
        if explicit_profile:
            log.info("gen_trt_engine.batch_size=%d fixes the engine's batch; "
                     "gen_trt_engine.tensorrt.*_batch_size do not apply", fixed)
        return fixed, fixed, fixed
    smallest = trt_config.min_batch_size
    optimal = trt_config.opt_batch_size or config.dataset.batch_size
    largest = trt_config.max_batch_size or max(optimal, config.dataset.batch_size)
    if not 1 <= smallest <= optimal <= largest:
        raise ConfigError(f"gen_trt_engine.tensorrt batch sizes must satisfy 1 <= min_batch_size <= "
                          f"opt_batch_size <= max_batch_size; got {smallest}, {optimal}, {largest}")
    return smallest, optimal, largest


def _half_inputs(card: ModelCard) -> dict[str, dict[str, tuple[tuple[int, ...], int]]]:
    """Each half's inputs: their shape after the first axis, and the first axis's entries per
    pair (the compare half takes feature rows, one per lighting tile for SiameseSpatial)."""
    rows, *row_shape = card.features_per_pair
    return {EMBED: {name: (card.input_shape, 1) for name in EMBED_INPUTS},
            COMPARE: {name: (tuple(row_shape), rows) for name in COMPARE_INPUTS}}


class _EngineBuilder:
    """TensorRT's builder with the spec's settings, one timing cache shared by every build."""

    def __init__(self, config: ExperimentConfig, cache_path: Path | None) -> None:
        self.trt = import_tensorrt()
        self.settings = config.gen_trt_engine.tensorrt
        self.key = config.encryption_key
        verbose = config.gen_trt_engine.verbose
        self.logger = self.trt.Logger(self.trt.Logger.VERBOSE if verbose else self.trt.Logger.WARNING)
        self.builder = self.trt.Builder(self.logger)
        self.cache_path = cache_path
        self.cache = None

    def build(self, onnx_path: Path, inputs: dict[str, tuple[tuple[int, ...], int]],
              profile: tuple[int, int, int] | None, engine_path: Path) -> None:
        """Build ``onnx_path`` into ``engine_path`` (written atomically, encrypted with the spec's
        key). ``inputs``: each input's shape after the first axis and its first-axis entries per
        pair, for the optimisation profile over ``profile`` pairs (none: a fixed-batch network)."""
        trt = self.trt
        network = self.builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if is_encrypted_file(onnx_path):
            parsed = parser.parse(read_plain(onnx_path, self.key))
        else:
            parsed = parser.parse_from_file(str(onnx_path))
        if not parsed:
            errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
            raise DataError(f"TensorRT cannot parse {onnx_path}: {errors}")
        build = self.builder.create_builder_config()
        build.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.settings.workspace_size * MIB)
        if self.settings.data_type == TrtDataType.FP16:
            build.set_flag(trt.BuilderFlag.FP16)
        if profile is not None:  # a fixed-batch network has static shapes and needs no profile
            shapes = self.builder.create_optimization_profile()
            for name, (shape, per_pair) in inputs.items():
                shapes.set_shape(name, *((size * per_pair, *shape) for size in profile))
            build.add_optimization_profile(shapes)
        if self.cache_path is not None:
            self._use_timing_cache(build)
        serialized = self.builder.build_serialized_network(network, build)
        if serialized is None:
            raise DataError(f"TensorRT could not build an engine from {onnx_path} (rerun with "
                            f"gen_trt_engine.verbose=true for the builder's log)")
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(engine_path) as out, protected_output(out, self.key) as sink:
            sink.write(memoryview(serialized))

    def keep_timing_cache(self) -> None:
        """Write the timing cache the builds filled (when the spec names one)."""
        if self.cache_path is None or self.cache is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.cache_path) as out:
            out.write(memoryview(self.cache.serialize()))

    def _use_timing_cache(self, build) -> None:
        """Start the build from the timing cache: the file's for the first build (an empty one when
        there is no file or it was made by another TensorRT version or GPU), then the same one."""
        if self.cache is None:
            path = self.cache_path
            cache = build.create_timing_cache(path.read_bytes() if path.is_file() else b"")
            if cache is None or not build.set_timing_cache(cache, ignore_mismatch=False):
                log.warning("%s does not fit this TensorRT version or GPU: building with a fresh timing "
                            "cache (it will be overwritten)", path)
                cache = build.create_timing_cache(b"")
            self.cache = cache
        build.set_timing_cache(self.cache, ignore_mismatch=False)
