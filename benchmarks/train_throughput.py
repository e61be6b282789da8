"""Training pairs/s of ``oi-ray train`` (Ray Train + Ray Data, 1 worker) vs a bare PyTorch loop.

Both train the same TAO model on the same synthetic pairs with the same batch size, optimiser,
fpratio sampling and thread count. The bare loop holds the decoded uint8 pictures in memory
and feeds them through a ``DataLoader`` with a ``WeightedRandomSampler`` (TAO's own recipe);
decoding is outside its clock. For oi-ray the rate is the one each epoch logs in
``status.json`` (training steps only; validation and Ray start-up excluded), averaged over the
epochs after the first. Also measured: oi-ray with ``train.mixed_precision`` and with
``train.channels_last``.

    python benchmarks/train_throughput.py --pairs 1000 --size 48 --epochs 3
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from oi_ray.config import load_config
from oi_ray.data.assemble import InputGeometry, read_pictures
from oi_ray.data.pairs import load_split
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.model.inputs import InputNormalizer
from oi_ray.model.loss import contrastive_loss
from oi_ray.model.siamese import build_model
from oi_ray.runtime import ray_session
from oi_ray.tasks import train
from oi_ray.training.loop import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--lights", default="WhiteLight,SolderLight")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    threads = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as tmp:
        spec_path = synthesize_dataset(Path(tmp) / "data", SyntheticSpec(
            num_pairs=args.pairs, lights=tuple(args.lights.split(",")), width=args.size,
            height=args.size, seed=0)).spec_path
        base = [f"train.num_epochs={args.epochs}", f"dataset.batch_size={args.batch_size}",
                f"train.validation_interval={args.epochs}", "ray.num_workers=1",
                f"ray.torch_threads={threads}"]
        config = load_config(spec_path, [*base, f"results_dir={tmp}/bare"])
        bare = _bare_pytorch(config, threads)
        runs = {}
        with ray_session(config.ray):
            for name, extra in (("oi-ray train", []),
                                ("oi-ray, mixed_precision", ["train.mixed_precision=true"]),
                                ("oi-ray, channels_last", ["train.channels_last=true"])):
                results = f"{tmp}/{len(runs)}"
                train.run(load_config(spec_path, [*base, f"results_dir={results}", *extra]))
                runs[name] = _logged_rate(Path(results) / "train/status.json")

    model_input = InputGeometry.from_config(config.dataset).input_shape
    print(f"\npairs: {bare[1]} training, input {model_input}, batch {args.batch_size}, "
          f"{args.epochs} epochs, {threads} torch threads")
    print(f"bare PyTorch DataLoader loop   : {bare[0]:7.1f} pairs/s")
    for name, rate in runs.items():
        print(f"{name:<31}: {rate:7.1f} pairs/s   ratio {rate / bare[0]:.2f}")


def _bare_pytorch(config, threads: int) -> tuple[float, int]:
    """Pairs/s of a plain loop over in-memory pictures, epochs after the first."""
    torch.set_num_threads(threads)
    torch.manual_seed(config.train.seed)
    dataset = config.dataset
    geometry = InputGeometry.from_config(dataset)
    table = load_split(dataset, "train_dataset")
    test = torch.from_numpy(read_pictures(table.test_paths, geometry))
    golden = torch.from_numpy(read_pictures(table.golden_paths, geometry))
    targets = torch.from_numpy(table.targets.astype(np.int64))
    passes, defects = int((targets == 0).sum()), int((targets == 1).sum())
    weights = torch.where(targets == 1, passes / defects * dataset.fpratio_sampling, 1.0)
    loader = DataLoader(TensorDataset(test, golden, targets), batch_size=dataset.batch_size, drop_last=True,
                        sampler=WeightedRandomSampler(weights, len(targets), replacement=True))
    net = build_model(config.model.model_type, geometry.input_shape, config.model.embedding_vectors)
    optimizer = make_optimizer(net.parameters(), config.train.optim)
    normalize = InputNormalizer(geometry)
    rates = []
    for _ in range(config.train.num_epochs):
        start, pairs = time.perf_counter(), 0
        for batch_test, batch_golden, target in loader:
            loss = contrastive_loss(net.distance(normalize(batch_test), normalize(batch_golden)), target,
                                    config.model.margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            pairs += len(target)
        rates.append(pairs / (time.perf_counter() - start))
    return float(np.mean(rates[1:] or rates)), len(targets)


def _logged_rate(status: Path) -> float:
    rates = [json.loads(line)["pairs_per_s"] for line in status.read_text().splitlines()]
    return float(np.mean(rates[1:] or rates))


if __name__ == "__main__":
    main()
