"""``oi-ray gen_trt_engine``: an exported ONNX model -> a serialized TensorRT engine (GPU only).

Honours TAO's ``gen_trt_engine.tensorrt`` fields: ``data_type`` fp32 / fp16,
``workspace_size`` in MiB (as documented; TAO itself reads it as GB), and
``min/opt/max_batch_size`` as the optimisation profile of the dynamic batch axis (opt and max
default to ``dataset.batch_size`` so the engine takes evaluate's batches). The model card is
copied beside the engine, so evaluate and inference use it like the ONNX model.
"""

import logging
from pathlib import Path

from oi_ray.config.schema import ExperimentConfig
from oi_ray.crypto import protect, unprotect
from oi_ray.errors import ConfigError, DataError
from oi_ray.fileio import write_atomically
from oi_ray.model_card import INPUT_NAMES, read_card
from oi_ray.predictors import import_tensorrt

log = logging.getLogger(__name__)
MIB = 1 << 20


def run(config: ExperimentConfig) -> None:
    """Build ``gen_trt_engine.trt_engine`` from ``gen_trt_engine.onnx_file``."""
    section, trt_config = config.gen_trt_engine, config.gen_trt_engine.tensorrt
    if not section.onnx_file:
        raise ConfigError("gen_trt_engine.onnx_file is not set: give the .onnx that `oi-ray export` wrote")
    if trt_config.data_type == "int8":
        raise ConfigError("gen_trt_engine.tensorrt.data_type='int8' is not supported yet (it needs a "
                          "calibration set); use fp16 or fp32")
    onnx_path = Path(section.onnx_file)
    if not onnx_path.is_file():
        raise DataError(f"ONNX model not found: {onnx_path}")
    card = read_card(onnx_path)
    card.check_matches(config, onnx_path)
    engine_path = Path(section.trt_engine or onnx_path.with_suffix(".engine")).resolve()
    trt = import_tensorrt()

    logger = trt.Logger(trt.Logger.VERBOSE if section.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(unprotect(onnx_path.read_bytes(), config.encryption_key, onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise DataError(f"TensorRT cannot parse {onnx_path}: {errors}")

    build = builder.create_builder_config()
    build.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, trt_config.workspace_size * MIB)
    if trt_config.data_type == "fp16":
        build.set_flag(trt.BuilderFlag.FP16)
    smallest = trt_config.min_batch_size
    optimal = trt_config.opt_batch_size or config.dataset.batch_size
    largest = trt_config.max_batch_size or max(optimal, config.dataset.batch_size)
    profile = builder.create_optimization_profile()
    for name in INPUT_NAMES:
        profile.set_shape(name, (smallest, *card.input_shape), (optimal, *card.input_shape),
                          (largest, *card.input_shape))
    build.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, build)
    if serialized is None:
        raise DataError(f"TensorRT could not build an engine from {onnx_path} (rerun with "
                        f"gen_trt_engine.verbose=true for the builder's log)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(engine_path, protect(bytes(serialized), config.encryption_key))
    card.write(engine_path)
    log.info("wrote %s (%s, batch %d..%d, optimised for %d)", engine_path, trt_config.data_type,
             smallest, largest, optimal)
