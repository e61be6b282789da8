"""TAO's Siamese_3 against SiameseSpatial (stride 2 and stride 4) on the same data, side by side.

Every model (``--models``; the stride-2 model with a 5x5 window is ``SiameseSpatial/n5``,
without the residual blocks ``SiameseSpatial/b0``) trains in the same plain PyTorch loop
(``bare_loop.py``: TAO's sampler, the contrastive loss with the same margin, Adam, batch,
epochs, threads and seed, in a process with the memory-allocator settings of oi-ray's Ray
workers), on the same decoded pictures; decoding is outside every clock. Each model then
scores the test split in eval mode. Per model: test AUROC, the false-alarm rate (share of PASS
pairs flagged) at 99 % and 100 % defect recall on the test split, the defect-recall threshold
calibrated on the validation split (train.calibration's default rule) and what it does on the
test split, training pairs/s (mean over the epochs after the first) and scoring pairs/s
(batches of 64), and the test defects it scores lowest. Two layouts by default: the synthetic
set's 4 lightings and a single lighting, both 100x100.

    python benchmarks/model_zoo.py --train-pairs 4000 --epochs 5
"""

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from bare_loop import train_bare, with_worker_allocator

from oi_ray.config import load_config
from oi_ray.config.schema import ExperimentConfig
from oi_ray.data.assemble import InputGeometry, read_pictures
from oi_ray.data.pairs import load_split
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.decision import flagged
from oi_ray.metrics import at_defect_recall, auroc, calibrate
from oi_ray.predictors import TorchPredictor
from oi_ray.runtime import WORKER_ALLOCATOR_ENV

TRAIN_SHARE = 0.6  # the generator's train split: 60 % of the pairs
MODELS = {
    "Siamese_3": ["model.model_type=Siamese_3"],
    "SiameseSpatial": ["model.model_type=SiameseSpatial", "model.spatial.stride=2"],
    "SiameseSpatial/4": ["model.model_type=SiameseSpatial", "model.spatial.stride=4"],
    "SiameseSpatial/n5": ["model.model_type=SiameseSpatial", "model.spatial.neighbourhood=5"],  # wider window
    "SiameseSpatial/b0": ["model.model_type=SiameseSpatial", "model.spatial.blocks=0"],  # no residual blocks
}
LAYOUTS = {"4 lights": "LowAngleLight,SolderLight,UniformLight,WhiteLight", "1 light": "WhiteLight"}
SCORE_BATCH = 64


@dataclass(frozen=True)
class Scored:
    """One split scored by one model."""

    distances: np.ndarray
    targets: np.ndarray
    pairs_per_s: float


def score(net: torch.nn.Module, config: ExperimentConfig, split: str, pictures: dict) -> Scored:
    """Distances for ``split`` (pictures decoded beforehand), timed without decoding."""
    predictor = TorchPredictor(net, InputGeometry.from_config(config.dataset))
    test, golden, targets = pictures[split]
    start = time.perf_counter()
    distances = np.concatenate([predictor.distances(test[index:index + SCORE_BATCH],
                                                    golden[index:index + SCORE_BATCH])
                                for index in range(0, len(test), SCORE_BATCH)])
    return Scored(distances, targets, len(test) / (time.perf_counter() - start))


def decoded(config: ExperimentConfig) -> dict:
    """The validation and test splits' pictures, decoded once for every model."""
    geometry = InputGeometry.from_config(config.dataset)
    result = {}
    for split in ("validation_dataset", "test_dataset"):
        table = load_split(config.dataset, split)
        result[split] = (read_pictures(table.test_paths, geometry),
                         read_pictures(table.golden_paths, geometry), table.targets)
    return result


def run_layout(name: str, lights: str, args: argparse.Namespace, folder: Path, threads: int) -> dict:
    num_pairs = round(args.train_pairs / TRAIN_SHARE)
    spec_path = synthesize_dataset(folder / name.replace(" ", "_"), SyntheticSpec(
        num_pairs=num_pairs, lights=tuple(lights.split(",")), width=args.size, height=args.size,
        image_ext=".png", seed=args.data_seed)).spec_path
    base = [f"train.num_epochs={args.epochs}", f"dataset.batch_size={args.batch_size}",
            f"train.seed={args.seed}", f"model.margin={args.margin}", f"train.optim.lr={args.lr}",
            f"results_dir={folder}/unused"]
    pictures = decoded(load_config(spec_path, base))
    table = load_split(load_config(spec_path, base).dataset, "test_dataset")
    rows = {}
    for model in args.models:
        config = load_config(spec_path, [*base, *MODELS[model]])
        run = train_bare(config, threads)
        run.net.eval()
        validation = score(run.net, config, "validation_dataset", pictures)
        test = score(run.net, config, "test_dataset", pictures)
        calibrated = calibrate(validation.distances, validation.targets, config.train.calibration)
        calls = flagged(test.distances, calibrated.threshold)
        passes, defects = test.targets == 0, test.targets == 1
        weakest = np.argsort(np.where(defects, test.distances, np.inf))[:3]
        rows[model] = {
            "auroc": auroc(test.distances, test.targets),
            "far_99": at_defect_recall(test.distances, test.targets, 0.99).false_alarm_rate,
            "far_100": at_defect_recall(test.distances, test.targets, 1.0).false_alarm_rate,
            "calibrated_recall": float(calls[defects].mean()), "calibrated_far": float(calls[passes].mean()),
            "train_rate": float(np.mean(run.rates[1:] if len(run.rates) > 1 else run.rates)),
            "score_rate": test.pairs_per_s,
            "weights": sum(parameter.numel() for parameter in run.net.parameters()),
            "weakest": [f"{table.rows.iloc[i]['label']} {table.rows.iloc[i]['object_name']} "
                        f"(row {i + 1}, {test.distances[i]:.3g})" for i in weakest],
        }
        row = rows[model]
        print(f"  {model:<17} AUROC {row['auroc']:.4f}  false alarms at 99% recall {row['far_99']:6.2%}  "
              f"at 100% {row['far_100']:6.2%}  calibrated on val: recall {row['calibrated_recall']:.2%}, "
              f"false alarms {row['calibrated_far']:.2%}  train {row['train_rate']:7.1f} pairs/s  "
              f"score {row['score_rate']:7.1f} pairs/s  {row['weights']:,} weights", flush=True)
    return rows


def main() -> None:
    with_worker_allocator()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-pairs", type=int, default=4000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--margin", type=float, default=2.0, help="model.margin (TAO's default)")
    parser.add_argument("--lr", type=float, default=5e-4, help="train.optim.lr, Adam (TAO's default)")
    parser.add_argument("--seed", type=int, default=1, help="train.seed: initial weights and sampler")
    parser.add_argument("--data-seed", type=int, default=0, help="the synthetic dataset's seed")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--models", nargs="+", default=["Siamese_3", "SiameseSpatial", "SiameseSpatial/4"],
                        choices=list(MODELS), help="the ratios need Siamese_3 among them")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    print(f"{args.train_pairs} training pairs, {args.size}x{args.size}, {args.epochs} epochs, batch "
          f"{args.batch_size}, margin {args.margin}, Adam lr {args.lr}, seed {args.seed}, {threads} threads, "
          f"{' '.join(f'{name}={os.environ.get(name)}' for name in WORKER_ALLOCATOR_ENV)}")
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts:
            print(f"{layout}:", flush=True)
            rows = run_layout(layout, LAYOUTS[layout], args, Path(tmp), threads)
            reference = rows.get("Siamese_3")
            for model in [name for name in rows if reference and name != "Siamese_3"]:
                row = rows[model]
                far_ratio = row["far_100"] / reference["far_100"] if reference["far_100"] else float("inf")
                print(f"  {model} vs Siamese_3: training {row['train_rate'] / reference['train_rate']:.2f}x "
                      f"the pairs/s, scoring {row['score_rate'] / reference['score_rate']:.2f}x, "
                      f"false alarms at 100% recall {far_ratio:.2f}x; weakest test defects: "
                      f"{'; '.join(row['weakest'])}")


if __name__ == "__main__":
    main()
