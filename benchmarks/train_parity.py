"""Test AUROC of ``oi-ray train`` vs the bare PyTorch loop over several seeds, on the same data.

Both train the same TAO model for the same epochs with the same loss, sampler semantics,
optimiser, batch, threads and seed (see ``bare_loop.py``), then score the test split the same
way (eval mode, in this process). oi-ray's seeds drive its model initialisation and its epoch
plans; the bare loop's drive its initialisation and its ``WeightedRandomSampler``. The
question: does oi-ray's mean AUROC lie within the bare loop's spread over seeds? With
``--replay``, a third column trains the bare loop on oi-ray's own draws (its epoch plans for
the seed, same initial weights): equal AUROCs there mean the two loops train alike, and any
difference in the other columns comes from the draws.

    python benchmarks/train_parity.py --pairs 2000 --size 48 --epochs 5 --seeds 1 2 3
"""

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from bare_loop import split_auroc_of_checkpoint, split_auroc_of_net, train_bare

from oi_ray.checkpoint import LATEST_NAME
from oi_ray.config import load_config
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.runtime import ray_session
from oi_ray.tasks import train


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000, help="dataset size (all splits)")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--lights", default="WhiteLight,SolderLight")
    parser.add_argument("--defect-ratio", type=float, default=0.5, help="balanced pairs by default")
    parser.add_argument("--fpratio", type=float, default=0.1, help="dataset.fpratio_sampling (TAO's 0.1)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--replay", action="store_true", help="also train the bare loop on oi-ray's draws")
    args = parser.parse_args()
    threads = os.cpu_count() or 1

    bare_aurocs, oi_ray_aurocs, replayed = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = synthesize_dataset(Path(tmp) / "data", SyntheticSpec(
            num_pairs=args.pairs, defect_ratio=args.defect_ratio, lights=tuple(args.lights.split(",")),
            width=args.size, height=args.size, seed=0)).spec_path
        for seed in args.seeds:
            common = [f"train.num_epochs={args.epochs}", f"dataset.batch_size={args.batch_size}",
                      f"dataset.fpratio_sampling={args.fpratio}", f"train.seed={seed}",
                      f"train.validation_interval={args.epochs}", f"train.checkpoint_interval={args.epochs}",
                      "ray.num_workers=1", f"ray.torch_threads={threads}"]
            bare_config = load_config(spec_path, [*common, f"results_dir={tmp}/bare{seed}"])
            bare_aurocs.append(split_auroc_of_net(train_bare(bare_config, threads).net, bare_config))
            config = load_config(spec_path, [*common, f"results_dir={tmp}/oi{seed}"])
            with ray_session(config.ray):
                train.run(config)
            checkpoint = Path(config.train.results_dir) / LATEST_NAME
            oi_ray_aurocs.append(split_auroc_of_checkpoint(checkpoint, config))
            if args.replay:
                replayed.append(split_auroc_of_net(train_bare(bare_config, threads, oi_ray_draws=True).net,
                                                   bare_config))
            extra = f", bare loop on oi-ray's draws {replayed[-1]:.4f}" if args.replay else ""
            print(f"seed {seed}: test AUROC bare {bare_aurocs[-1]:.4f}, "
                  f"oi-ray {oi_ray_aurocs[-1]:.4f}{extra}", flush=True)

    low, high = min(bare_aurocs), max(bare_aurocs)
    mean = float(np.mean(oi_ray_aurocs))
    print(f"\n{args.pairs} pairs, {args.size}x{args.size}, lights {args.lights}, defect ratio "
          f"{args.defect_ratio}, fpratio {args.fpratio}, {args.epochs} epochs, seeds {args.seeds}")
    print(f"bare loop : {' '.join(f'{value:.4f}' for value in bare_aurocs)}  mean {np.mean(bare_aurocs):.4f}")
    print(f"oi-ray    : {' '.join(f'{value:.4f}' for value in oi_ray_aurocs)}  mean {mean:.4f}")
    if args.replay:
        print(f"bare loop on oi-ray's draws: {' '.join(f'{value:.4f}' for value in replayed)}")
    verdict = "within" if low <= mean <= high else "OUTSIDE"
    print(f"oi-ray's mean {mean:.4f} is {verdict} the bare loop's spread [{low:.4f}, {high:.4f}]")


if __name__ == "__main__":
    main()
