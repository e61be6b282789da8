"""Pairs/s of the scoring backends and of the two model types on the same inputs, side by side.

CPU: ONNX Runtime vs torch eager (both through oi-ray's predictors, uint8 pictures in,
distances out, the torch model as ``evaluate`` loads a checkpoint: BatchNorms folded into their
convolutions) at batch 1 and 32, for TAO's Siamese_3 and for SiameseSpatial (stride 2), with
random weights at the given lightings and image size (4 x 100x100 by default: TAO's documented
setup). The last lines give SiameseSpatial's pairs/s over Siamese_3's per backend and batch.
With an NVIDIA GPU and the ``gpu`` extra also TensorRT vs ONNX Runtime's CUDA provider.

    python benchmarks/inference_backends.py --lights 4 --size 100
"""

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from oi_ray.config import load_config
from oi_ray.config.schema import ModelType
from oi_ray.data.assemble import InputGeometry
from oi_ray.model.folding import fold_batch_norms
from oi_ray.model.registry import Architecture
from oi_ray.model_card import ModelCard
from oi_ray.predictors import OnnxPredictor, Predictor, TensorRTPredictor, TorchPredictor
from oi_ray.tasks.export import export_onnx

LIGHTS = ("LowAngleLight", "SolderLight", "UniformLight", "WhiteLight")
MODELS = (ModelType.SIAMESE_3, ModelType.SPATIAL)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lights", type=int, default=4, choices=range(1, 5))
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per backend and batch")
    args = parser.parse_args()

    lights = ",".join(f"{name}: {index}" for index, name in enumerate(LIGHTS[: args.lights]))
    rates: dict[tuple[str, str, int], float] = {}
    for model_type in MODELS:
        config = load_config(None, [f"dataset.input_map={{{lights}}}", f"dataset.image_width={args.size}",
                                    f"dataset.image_height={args.size}", f"model.model_type={model_type}"])
        geometry = InputGeometry.from_config(config.dataset)
        torch.manual_seed(0)
        architecture = Architecture.of(config.model, geometry)
        model = architecture.build().eval()
        onnx_bytes = export_onnx(model, architecture, 1, dynamic=True, opset=17, constant_folding=True)
        backends: dict[str, Predictor] = {
            "torch eager (CPU)": TorchPredictor(fold_batch_norms(copy.deepcopy(model)), geometry),
            "ONNX Runtime (CPU)": OnnxPredictor(onnx_bytes, geometry, threshold=None,
                                                output_names=architecture.output_names),
        }
        if torch.cuda.is_available():
            backends.update(_gpu_backends(config, architecture, onnx_bytes, geometry))
        print(f"model {architecture.describe()}, {torch.get_num_threads()} torch threads")
        for batch in args.batches:
            rng = np.random.default_rng(batch)
            _, height, width = geometry.input_shape
            test, golden = (rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8) for _ in range(2))
            print(f"batch {batch}:")
            for name, backend in backends.items():
                rates[model_type, name, batch] = rate = _pairs_per_second(backend, test, golden, args.seconds)
                print(f"  {name:<26}{rate:10.1f} pairs/s", flush=True)
            measured = {name: rates[model_type, name, batch] for name in backends}
            print(f"  ratio ONNX Runtime / torch (CPU): "
                  f"{measured['ONNX Runtime (CPU)'] / measured['torch eager (CPU)']:.2f}")
            if torch.cuda.is_available():
                print(f"  ratio TensorRT / ORT CUDA: "
                      f"{measured['TensorRT'] / measured['ONNX Runtime (CUDA)']:.2f}")
    print(f"{ModelType.SPATIAL} / {ModelType.SIAMESE_3}, pairs/s (target >= 1 on the CPU):")
    for (model_type, name, batch), rate in rates.items():
        if model_type == ModelType.SPATIAL:
            print(f"  {name:<26} batch {batch:>3}: {rate / rates[ModelType.SIAMESE_3, name, batch]:.2f}")
    if not torch.cuda.is_available():
        print("no NVIDIA GPU: TensorRT vs ONNX Runtime CUDA not measured")


def _gpu_backends(config, architecture: Architecture, onnx_bytes: bytes,
                  geometry: InputGeometry) -> dict[str, Predictor]:
    from oi_ray.tasks import gen_trt_engine

    outputs = architecture.output_names
    cuda = OnnxPredictor(onnx_bytes, geometry, threshold=None, use_gpu=True, output_names=outputs)
    backends: dict[str, Predictor] = {"ONNX Runtime (CUDA)": cuda}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file, engine = Path(tmp) / "m.onnx", Path(tmp) / "m.engine"
        onnx_file.write_bytes(onnx_bytes)
        ModelCard.describe(config, None, batch_size=-1, opset_version=17, oi_ray_version="bench",
                           source_checkpoint="random", source_checkpoint_sha256="").write(onnx_file)
        config.gen_trt_engine.onnx_file, config.gen_trt_engine.trt_engine = str(onnx_file), str(engine)
        config.dataset.batch_size = 32
        gen_trt_engine.run(config)
        backends["TensorRT"] = TensorRTPredictor(engine.read_bytes(), geometry, threshold=None,
                                                 output_names=outputs)
    return backends


def _pairs_per_second(backend: Predictor, test: np.ndarray, golden: np.ndarray, seconds: float) -> float:
    backend.distances(test, golden)  # warm-up: allocations, kernel selection
    pairs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        backend.distances(test, golden)
        pairs += len(test)
    return pairs / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
