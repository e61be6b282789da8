"""``oi-ray quickstart``: synthetic data -> train -> evaluate -> inference -> ONNX export on an
embedded Ray.

Small enough for a laptop CPU (a few minutes on 2 cores): two lightings at 48x48, where the
TAO model's first layer stays near 19 M weights, and enough pairs that it clearly beats a
pixel-difference baseline after 5 epochs.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from oi_ray.config import load_config
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.runtime import ray_session
from oi_ray.tasks import evaluate, export, inference, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuickstartSpec:
    """Options of ``oi-ray quickstart``."""

    output: Path
    num_pairs: int = 1000
    epochs: int = 5
    size: int = 48
    lights: tuple[str, ...] = ("WhiteLight", "SolderLight")
    fpratio_sampling: float = 0.5  # more defects per epoch than TAO's 0.1: a short run learns them
    overwrite: bool = False


def run_quickstart(spec: QuickstartSpec) -> Path:
    """Run the whole workflow under ``spec.output``; return the spec file it used."""
    output = spec.output.resolve()
    data = synthesize_dataset(output / "data", SyntheticSpec(
        num_pairs=spec.num_pairs, lights=spec.lights, width=spec.size, height=spec.size, seed=0,
    ), overwrite=spec.overwrite)
    log.info(data.describe())
    overrides = [f"results_dir={output / 'results'}", f"train.num_epochs={spec.epochs}",
                 f"dataset.fpratio_sampling={spec.fpratio_sampling}"]
    config = load_config(data.spec_path, overrides)
    with ray_session(config.ray):
        for step in (train, evaluate, inference, export):
            log.info("== oi-ray %s -e %s %s", step.__name__.rsplit(".", 1)[-1], data.spec_path,
                     " ".join(overrides))
            step.run(config)
    results = output / "results"
    onnx_file = results / "export/oi_model.onnx"
    log.info("quickstart done. Spec: %s\n  checkpoints: %s\n  metrics:     %s\n  inference:   %s\n"
             "  ONNX model:  %s (+ .json model card)\n"
             "Rerun any step with the command lines shown above; score with the ONNX model:\n"
             "  oi-ray inference -e %s results_dir=%s inference.checkpoint=%s",
             data.spec_path, results / "train", results / "evaluate/metrics.json",
             results / "inference/inference.csv", onnx_file, data.spec_path, results, onnx_file)
    return data.spec_path
