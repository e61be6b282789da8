"""TAO's Siamese_3 against SiameseSpatial on the same data, side by side, each with its recipe.

Every model trains with its own documented recipe (``configs/recipes/``: learning rate,
schedule, epochs; batch, margin and fpratio as TAO's), in the same plain PyTorch loop
(``bare_loop.py``: TAO's sampler, the contrastive loss, Adam, threads and seed, in a process
with the memory-allocator settings of oi-ray's Ray workers), on the same decoded pictures;
decoding is outside every clock. The budget is Siamese_3's: every model's training time (its
optimisation steps alone) is reported against the time TAO's 5 epochs of Siamese_3 take in the
same run, so Siamese_3 trains first.

Data: ``--data DIR`` takes any TAO-layout folder (``train.csv``, ``val.csv``, optionally
``test.csv``, and ``images/``; the lighting names and image extension are read off its files).
``--train-pairs`` rows of ``train.csv`` (seeded) train every model. With a ``test.csv`` (the
generator's layout) the threshold is calibrated on ``val.csv`` and the report is on
``test.csv``; without one (the DeepPCB development set) the threshold is calibrated on
``--calibration-pairs`` other rows of ``train.csv`` and the report is on ``val.csv``. Without
``--data`` the generator writes the synthetic set in two layouts (4 lightings and 1), 100x100.

Per model, on the report split: AUROC, the false-alarm rate (share of PASS pairs flagged) at
99 % and 100 % defect recall and at 100 % with the 1 and 3 weakest defects left out, what the
calibrated threshold (train.calibration's default rule) does, training pairs/s (mean over the
epochs after the first), training seconds against the budget, scoring pairs/s (batches of 64),
and the defects it scores lowest.

    python benchmarks/model_zoo.py --data /path/to/deeppcb_dev_set
    python benchmarks/model_zoo.py --layouts "4 lights"
"""

import argparse
import copy
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bare_loop import train_bare, with_worker_allocator
from PIL import Image

from oi_ray.config import load_config
from oi_ray.config.schema import ExperimentConfig
from oi_ray.data.assemble import InputGeometry, read_pictures
from oi_ray.data.pairs import load_split
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.decision import flagged
from oi_ray.metrics import at_defect_recall, auroc, calibrate, without_weakest_defects
from oi_ray.model.folding import fold_batch_norms
from oi_ray.predictors import TorchPredictor
from oi_ray.runtime import WORKER_ALLOCATOR_ENV

RECIPES = Path(__file__).resolve().parent.parent / "configs" / "recipes"
TRAIN_SHARE = 0.6  # the generator's train split: 60 % of the pairs
MODELS = {  # name -> the model's recipe and what the variant changes in it
    "Siamese_3": (RECIPES / "siamese_3.yaml", []),
    "SiameseSpatial": (RECIPES / "siamese_spatial.yaml", []),
    "SiameseSpatial/4": (RECIPES / "siamese_spatial.yaml", ["model.spatial.stride=4"]),
}
LAYOUTS = {"4 lights": "LowAngleLight,SolderLight,UniformLight,WhiteLight", "1 light": "WhiteLight"}
SCORE_BATCH = 64
SPLITS = {"train": "train_dataset", "calibration": "validation_dataset", "report": "test_dataset"}


@dataclass(frozen=True)
class Scored:
    """One split scored by one model."""

    distances: np.ndarray
    targets: np.ndarray
    pairs_per_s: float


def dataset_keys(folder: Path, protocol: Path, args: argparse.Namespace) -> list[str]:
    """Spec keys for the benchmark's three splits of the TAO-layout ``folder``, whose CSVs are
    written to ``protocol``: the training pairs, the calibration split and the report split."""
    train = pd.read_csv(folder / "train.csv")
    order = np.random.default_rng(args.data_seed).permutation(len(train))
    chosen = {"train": train.iloc[np.sort(order[:args.train_pairs])]}
    if (folder / "test.csv").exists():
        chosen["calibration"] = pd.read_csv(folder / "val.csv")
        chosen["report"] = pd.read_csv(folder / "test.csv")
    else:
        held_back = order[args.train_pairs:args.train_pairs + args.calibration_pairs]
        chosen["calibration"] = train.iloc[np.sort(held_back)]
        chosen["report"] = pd.read_csv(folder / "val.csv")
    protocol.mkdir(parents=True, exist_ok=True)
    keys = []
    for name, frame in chosen.items():
        frame.to_csv(protocol / f"{name}.csv", index=False)
        keys += [f"dataset.{SPLITS[name]}.csv_path={protocol / f'{name}.csv'}",
                 f"dataset.{SPLITS[name]}.images_dir={folder / 'images'}"]
    first = train.iloc[0]
    lights, extension = lightings(folder / "images" / first["input_path"], first["object_name"])
    first_image = folder / "images" / first["input_path"] / f"{first['object_name']}_{lights[0]}{extension}"
    with Image.open(first_image) as image:
        width, height = image.size
    return [*keys, f"dataset.input_map={{{', '.join(f'{light}: {i}' for i, light in enumerate(lights))}}}",
            f"dataset.num_input={len(lights)}", f"dataset.image_ext={extension}",
            f"dataset.image_width={width}", f"dataset.image_height={height}"]


def lightings(side: Path, object_name: str) -> tuple[list[str], str]:
    """The lighting names (sorted) and the image extension of ``object_name``'s files in ``side``
    (TAO's names: ``<object_name>_<lighting><ext>``)."""
    files = sorted(path for path in side.glob(f"{object_name}_*") if path.is_file())
    if not files:
        raise SystemExit(f"{side}: no images of {object_name!r}; is this a TAO-layout dataset?")
    return [path.stem[len(object_name) + 1:] for path in files], files[0].suffix


def score(net: torch.nn.Module, config: ExperimentConfig, pictures: tuple) -> Scored:
    """Distances for pictures decoded beforehand, timed without decoding, by the network as
    ``evaluate`` loads it from its checkpoint (BatchNorms folded into their convolutions)."""
    folded = fold_batch_norms(copy.deepcopy(net).eval())
    predictor = TorchPredictor(folded, InputGeometry.from_config(config.dataset))
    test, golden, targets = pictures
    start = time.perf_counter()
    distances = np.concatenate([predictor.distances(test[index:index + SCORE_BATCH],
                                                    golden[index:index + SCORE_BATCH])
                                for index in range(0, len(test), SCORE_BATCH)])
    return Scored(distances, targets, len(test) / (time.perf_counter() - start))


def decoded(config: ExperimentConfig, split: str) -> tuple[tuple, pd.DataFrame]:
    """A split's pictures (test, golden, targets), decoded once for every model, and its CSV rows."""
    geometry = InputGeometry.from_config(config.dataset)
    table = load_split(config.dataset, split)
    test, golden = (read_pictures(paths, geometry) for paths in (table.test_paths, table.golden_paths))
    return (test, golden, table.targets), table.rows


def run_dataset(folder: Path, args: argparse.Namespace, scratch: Path, threads: int) -> dict:
    """Train and score every model of ``args.models`` on ``folder``; print a line per model."""
    keys = [*dataset_keys(folder, scratch / "protocol", args), f"results_dir={scratch}/unused",
            f"train.seed={args.seed}"]
    base = load_config(MODELS["Siamese_3"][0], keys)
    calibration, _ = decoded(base, "validation_dataset")
    report, rows_of_report = decoded(base, "test_dataset")
    print(f"  {len(pd.read_csv(base.dataset.train_dataset.csv_path))} training pairs; calibrated on "
          f"{len(calibration[2])}, reported on {len(report[2])} ({int(report[2].sum())} defects)", flush=True)
    rows, budget = {}, None
    for model in args.models:
        recipe, variant = MODELS[model]
        config = load_config(recipe, [*keys, *variant])
        run = train_bare(config, threads)
        run.net.eval()
        calibrated = calibrate(score(run.net, config, calibration).distances, calibration[2],
                               config.train.calibration)
        test = score(run.net, config, report)
        calls = flagged(test.distances, calibrated.threshold)
        passes, defects = test.targets == 0, test.targets == 1
        weakest = np.argsort(np.where(defects, test.distances, np.inf))[:3]
        budget = budget or (run.seconds if model == "Siamese_3" else None)
        rows[model] = row = {
            "auroc": auroc(test.distances, test.targets),
            "far_99": at_defect_recall(test.distances, test.targets, 0.99).false_alarm_rate,
            "far_100": at_defect_recall(test.distances, test.targets, 1.0).false_alarm_rate,
            **{f"far_100_less_{left_out}": without_weakest_defects(test.distances, test.targets,
                                                                   left_out).false_alarm_rate
               for left_out in (1, 3)},
            "calibrated_recall": float(calls[defects].mean()), "calibrated_far": float(calls[passes].mean()),
            "train_rate": float(np.mean(run.rates[1:] if len(run.rates) > 1 else run.rates)),
            "train_seconds": run.seconds, "score_rate": test.pairs_per_s,
            "weights": sum(parameter.numel() for parameter in run.net.parameters()),
            "weakest": [f"{rows_of_report.iloc[i]['label']} {rows_of_report.iloc[i]['object_name']} "
                        f"(row {i + 1}, {test.distances[i]:.3g})" for i in weakest],
        }
        within = f"{run.seconds / budget:.2f}x the budget" if budget else "no budget: Siamese_3 not run first"
        print(f"  {model:<17} {config.train.num_epochs} epochs lr {config.train.optim.lr:g} "
              f"{config.train.optim.lr_schedule}: AUROC {row['auroc']:.4f}  false alarms at 99% recall "
              f"{row['far_99']:6.2%}  at 100% {row['far_100']:6.2%} (without the weakest 1: "
              f"{row['far_100_less_1']:6.2%}, 3: {row['far_100_less_3']:6.2%})  calibrated: recall "
              f"{row['calibrated_recall']:.2%}, false alarms {row['calibrated_far']:.2%}  train "
              f"{row['train_rate']:6.1f} pairs/s, {run.seconds:5.0f} s ({within})  score "
              f"{row['score_rate']:6.1f} pairs/s  {row['weights']:,} weights", flush=True)
    return rows


def main() -> None:
    with_worker_allocator()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a TAO-layout dataset folder (default: synthetic layouts)")
    parser.add_argument("--train-pairs", type=int, default=4000)
    parser.add_argument("--calibration-pairs", type=int, default=1000,
                        help="held back from train.csv when the folder has no test.csv")
    parser.add_argument("--size", type=int, default=100, help="the synthetic images' side")
    parser.add_argument("--seed", type=int, default=1, help="train.seed: initial weights and sampler")
    parser.add_argument("--data-seed", type=int, default=0, help="the synthetic set's and the split's seed")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--models", nargs="+", default=["Siamese_3", "SiameseSpatial"], choices=list(MODELS),
                        help="Siamese_3 first: its training time is the budget")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    print(f"{args.train_pairs} training pairs, seed {args.seed}, {threads} threads, "
          f"{' '.join(f'{name}={os.environ.get(name)}' for name in WORKER_ALLOCATOR_ENV)}")
    print(f"recipes: {RECIPES}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is not None:
            datasets = {str(args.data): args.data.resolve()}
        else:
            datasets = {layout: synthesize_dataset(Path(tmp) / layout.replace(" ", "_"), SyntheticSpec(
                num_pairs=round(args.train_pairs / TRAIN_SHARE), lights=tuple(LAYOUTS[layout].split(",")),
                width=args.size, height=args.size, image_ext=".png", seed=args.data_seed)).spec_path.parent
                for layout in args.layouts}
        for name, folder in datasets.items():
            print(f"{name}:", flush=True)
            rows = run_dataset(folder, args, Path(tmp) / "run", threads)
            reference = rows.get("Siamese_3")
            for model in [model for model in rows if reference and model != "Siamese_3"]:
                row = rows[model]
                far_ratio = row["far_100"] / reference["far_100"] if reference["far_100"] else float("inf")
                print(f"  {model} vs Siamese_3: training {row['train_rate'] / reference['train_rate']:.2f}x "
                      f"the pairs/s, scoring {row['score_rate'] / reference['score_rate']:.2f}x, "
                      f"false alarms at 100% recall {far_ratio:.2f}x; weakest defects: "
                      f"{'; '.join(row['weakest'])}")


if __name__ == "__main__":
    main()
