"""A sweep with `oi-ray tune` vs the same trainings run one after the other with `oi-ray train`.

N trainings of one spec that differ only in ``model.margin`` (a grid, so both sides train
exactly the same points), on synthetic data, each a separate command as a user would run it
(Python start, embedded Ray, decoding, training, checkpoints): in one run,

1. sequential: ``oi-ray train`` once per margin, one after the other (1 worker, which gets
   all the machine's cores as torch threads);
2. ``oi-ray tune`` over the same grid, ``max_concurrent_trials`` trials at a time (1 worker
   each, the cores shared between them), the images decoded once for the sweep;
3. the same sweep with ``tune.share_decoded_images=false``: every trial decodes its own.

No scheduler (every trial runs every epoch, as the sequential runs do). Ratios: each sweep's
wall time over the sequential sum (target: below 1 with ``--concurrent`` >= 2). The final
validation AUROC of every training is printed beside it, so both sides are seen doing the
same work.

    python benchmarks/tune_overhead.py [--trials 4] [--concurrent 2] [--pairs 1200] [--size 64]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset

SWEEPS = (("shared", "true", "decoded once for the sweep"), ("own", "false", "decoded by every trial"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--concurrent", type=int, default=2, help="tune.max_concurrent_trials")
    parser.add_argument("--pairs", type=int, default=1200, help="dataset size (all splits)")
    parser.add_argument("--lights", default="WhiteLight,SolderLight,UVLight,LowAngleLight")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workdir", type=Path,
                        help="keep the data, logs and every run's results here (default: a temporary folder, "
                             "removed at the end: the checkpoints take tens of GB)")
    args = parser.parse_args()
    if args.workdir:
        _compare(args, args.workdir.resolve())
        return
    with tempfile.TemporaryDirectory(prefix="oi-ray-tune-overhead-") as folder:
        _compare(args, Path(folder))


def _compare(args: argparse.Namespace, workdir: Path) -> None:
    """Both sides in ``workdir``, then the ratios."""
    lights = tuple(args.lights.split(","))
    spec = synthesize_dataset(workdir / "data", SyntheticSpec(
        num_pairs=args.pairs, lights=lights, width=args.size, height=args.size, seed=0)).spec_path
    margins = [round(float(margin), 3) for margin in np.linspace(1.0, 2.5, args.trials)]
    common = ["-e", str(spec), f"train.num_epochs={args.epochs}", "train.validation_interval=1",
              "train.checkpoint_interval=1", "dataset.batch_size=32", "train.seed=1234",
              "ray.num_workers=1", "ray.cpus_per_worker=1"]
    print(f"{args.trials} trainings (model.margin {margins}), {args.epochs} epochs each; {args.pairs} pairs "
          f"of {len(lights)} x {args.size}x{args.size} JPEG per side; {os.cpu_count()} cores; logs in "
          f"{workdir}", flush=True)

    sequential = [_train(common, margin, workdir, index) for index, margin in enumerate(margins)]
    sweeps = {name: _sweep(common, margins, args.concurrent, workdir, name, shared)
              for name, shared, _ in SWEEPS}

    total = sum(seconds for _, seconds, _ in sequential)
    print(f"\n{'model.margin':>12} {'val_auroc: sequential':>22} {'sweep, shared':>14} "
          f"{'sweep, per trial':>17}")
    for margin, _, auroc in sequential:
        shared, own = sweeps["shared"][1][margin], sweeps["own"][1][margin]
        print(f"{margin:>12} {auroc:>22.4f} {shared:>14.4f} {own:>17.4f}")
    print(f"\nsequential oi-ray train, sum of {len(sequential)} runs: {total:.1f} s")
    for name, _, label in SWEEPS:
        seconds = sweeps[name][0]
        print(f"oi-ray tune, {args.concurrent} trials at a time, images {label}: {seconds:.1f} s, "
              f"ratio {seconds / total:.2f} of sequential")


def _train(common: list[str], margin: float, workdir: Path, index: int) -> tuple[float, float, float]:
    """One ``oi-ray train`` run: (margin, seconds, final val_auroc)."""
    results = workdir / "sequential" / f"margin_{margin}"
    seconds = _timed(["train", *common, f"results_dir={results}", f"model.margin={margin}"],
                     workdir / f"sequential_{index}.log")
    auroc = float(json.loads((results / "train" / "status.json").read_text().splitlines()[-1])["val_auroc"])
    print(f"  oi-ray train model.margin={margin}: {seconds:.1f} s, val_auroc {auroc:.4f}", flush=True)
    return margin, seconds, auroc


def _sweep(common: list[str], margins: list[float], concurrent: int, workdir: Path, name: str,
           shared: str) -> tuple[float, dict[float, float]]:
    """One ``oi-ray tune`` grid over ``margins``: (seconds, margin -> last val_auroc)."""
    seconds = _timed(["tune", *common, f"results_dir={workdir / 'sweeps'}", f"tune.name={name}",
                      f"tune.share_decoded_images={shared}", "tune.search_alg=grid", "tune.num_samples=1",
                      "tune.scheduler.type=none", f"tune.max_concurrent_trials={concurrent}",
                      "tune.resources_per_trial={num_workers: 1, cpus_per_worker: 1}",
                      f"tune.search_space={{model.margin: {{type: grid, values: {margins}}}}}"],
                     workdir / f"sweep_{name}.log")
    table = pd.read_csv(workdir / "sweeps" / "tune" / name / "results.csv")
    print(f"  oi-ray tune (tune.share_decoded_images={shared}): {seconds:.1f} s", flush=True)
    return seconds, dict(zip(table["model.margin"], table["last_val_auroc"], strict=True))


def _timed(arguments: list[str], log: Path) -> float:
    """Run one oi-ray command to completion (its output into ``log``); its wall time."""
    start = time.perf_counter()
    with log.open("w") as output:
        done = subprocess.run([sys.executable, "-m", "oi_ray.cli", *arguments], stdout=output,
                              stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"oi-ray {arguments[0]} failed (exit {done.returncode}); see {log}")
    return seconds


if __name__ == "__main__":
    main()
