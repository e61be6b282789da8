"""``oi-ray quickstart``: synthetic data -> train -> evaluate -> inference on an embedded Ray.

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
from oi_ray.tasks import evaluate, inference, train

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
        for step in (train, evaluate, inference):
            log.info("== oi-ray %s -e %s %s", step.__name__.rsplit(".", 1)[-1], data.spec_path,
                     " ".join(overrides))
            step.run(config)
    results = output / "results"
    log.info("quickstart done. Spec: %s\n  checkpoints: %s\n  metrics:     %s\n  inference:   %s\n"
             "Rerun any step with the command lines shown above.", data.spec_path, results / "train",
             results / "evaluate/metrics.json", results / "inference/inference.csv")
    return data.spec_path
