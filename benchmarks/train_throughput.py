"""Training pairs/s of ``oi-ray train`` (Ray Train + Ray Data, 1 worker) vs a bare PyTorch loop.

Both train the same TAO model on the same synthetic pairs with the same batch size, optimiser,
fpratio sampling, seed and thread count (see ``bare_loop.py`` for the reference loop). For
oi-ray the rate is the one each epoch logs in ``status.json`` (training steps including the
epoch's plan and batch gathering; validation and Ray start-up excluded). Both sides average
the epochs after the first. Run at several dataset sizes: 1000 pairs give 720 training pairs,
7000 give about 5000.

    python benchmarks/train_throughput.py --pairs 1000 7000 --size 48 --epochs 3
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from bare_loop import train_bare, with_worker_allocator

from oi_ray.config import load_config
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.runtime import ray_session
from oi_ray.tasks import train


def main() -> None:
    with_worker_allocator()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[1000, 7000],
                        help="dataset sizes (all splits)")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--lights", default="WhiteLight,SolderLight")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    threads = os.cpu_count() or 1

    rows = []
    for pairs in args.pairs:
        with tempfile.TemporaryDirectory() as tmp:
            spec_path = synthesize_dataset(Path(tmp) / "data", SyntheticSpec(
                num_pairs=pairs, lights=tuple(args.lights.split(",")), width=args.size,
                height=args.size, seed=0)).spec_path
            common = [f"train.num_epochs={args.epochs}", f"dataset.batch_size={args.batch_size}",
                      f"train.validation_interval={args.epochs}", f"train.checkpoint_interval={args.epochs}",
                      "ray.num_workers=1", f"ray.torch_threads={threads}"]
            bare = train_bare(load_config(spec_path, [*common, f"results_dir={tmp}/bare"]), threads)
            config = load_config(spec_path, [*common, f"results_dir={tmp}/oi"])
            with ray_session(config.ray):
                train.run(config)
            oi_ray = _logged_rate(Path(config.train.results_dir) / "status.json")
        bare_rate = float(np.mean(bare.rates[1:] or bare.rates))
        rows.append((bare.training_pairs, bare_rate, oi_ray))
        print(f"{bare.training_pairs} training pairs: bare {bare_rate:.1f} pairs/s, oi-ray {oi_ray:.1f} "
              f"pairs/s, ratio {oi_ray / bare_rate:.2f}", flush=True)

    print(f"\n{args.size}x{args.size}, lights {args.lights}, batch {args.batch_size}, {args.epochs} epochs, "
          f"{threads} torch threads")
    print(f"{'training pairs':>15} {'bare loop':>12} {'oi-ray train':>14} {'ratio':>7}")
    for training_pairs, bare_rate, oi_ray in rows:
        print(f"{training_pairs:>15} {bare_rate:>12.1f} {oi_ray:>14.1f} {oi_ray / bare_rate:>7.2f}")


def _logged_rate(status: Path) -> float:
    rates = [json.loads(line)["pairs_per_s"] for line in status.read_text().splitlines()]
    return float(np.mean(rates[1:] or rates))


if __name__ == "__main__":
    main()
