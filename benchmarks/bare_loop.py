"""The reference both training benchmarks compare oi-ray against: a plain PyTorch loop.

It trains the same TAO model with the same loss, optimiser rule, batch size, thread count and
seed as ``oi-ray train``, on the same decoded pictures held in memory, drawn each epoch by a
``DataLoader`` with TAO's own ``WeightedRandomSampler`` (with replacement, epoch length = rows,
defects weighted ``num_pass / num_defect * fpratio_sampling``). Decoding is outside its clock.
A benchmark that times it calls ``with_worker_allocator`` first, so that it allocates memory as
oi-ray's Ray workers do.
"""

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from oi_ray.config.schema import ExperimentConfig
from oi_ray.data.assemble import InputGeometry, read_pictures
from oi_ray.data.epochs import epoch_plan
from oi_ray.data.pairs import load_split
from oi_ray.metrics import auroc
from oi_ray.model.inputs import InputNormalizer, LightingGain
from oi_ray.model.registry import Architecture
from oi_ray.model_card import ModelCard
from oi_ray.model_file import open_model_file
from oi_ray.predictors import TorchPredictor
from oi_ray.runtime import allocator_settings_unset
from oi_ray.training.step import Precision, StepRule, make_optimizer, training_steps


def with_worker_allocator() -> None:
    """Run this benchmark again, at once, with the memory-allocator settings oi-ray gives its Ray
    workers (``oi_ray.runtime.WORKER_ALLOCATOR_ENV``), unless its environment already sets them:
    glibc reads them when a process starts."""
    missing = allocator_settings_unset()
    if missing:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})


@dataclass(frozen=True)
class BareRun:
    """A trained model, its training pairs/s per epoch and its training seconds (steps only)."""

    net: torch.nn.Module
    rates: list[float]
    training_pairs: int
    seconds: float


def train_bare(config: ExperimentConfig, threads: int, *, oi_ray_draws: bool = False) -> BareRun:
    """Train ``config``'s model for ``train.num_epochs`` epochs in a plain loop.

    ``oi_ray_draws``: instead of the sampler, take each epoch's rows from oi-ray's own epoch
    plan (the same draws ``oi-ray train`` makes with this seed), to compare the loops alone."""
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
    sampler = WeightedRandomSampler(weights, len(targets), replacement=True,
                                    generator=torch.Generator().manual_seed(config.train.seed))
    pairs = TensorDataset(test, golden, targets)
    loader = DataLoader(pairs, batch_size=dataset.batch_size, drop_last=True, sampler=sampler)
    net = Architecture.of(config.model, geometry).build()
    optimizer = make_optimizer(net.parameters(), config.train.optim)
    normalize = InputNormalizer(geometry, gain=LightingGain.of(dataset, seed=(config.train.seed,)))
    rule, precision = StepRule.of(config), Precision(torch.device("cpu"), enabled=False)
    rates, seconds = [], 0.0
    for epoch in range(1, config.train.num_epochs + 1):
        net.train()
        normalize.start_epoch(epoch)
        start = time.perf_counter()
        if oi_ray_draws:
            plan = epoch_plan(table.targets, dataset.fpratio_sampling, seed=config.train.seed,
                              epoch=epoch - 1, world=1, batch_size=dataset.batch_size)[0]
            drawn = (pairs[rows] for rows in plan.reshape(-1, dataset.batch_size))
        else:
            drawn = loader
        batches = ((normalize(batch_test), normalize(batch_golden), target)
                   for batch_test, batch_golden, target in drawn)
        steps = len(targets) // dataset.batch_size
        for _ in training_steps(net.distance, optimizer, batches, rule, precision, epoch=epoch, steps=steps):
            pass
        elapsed = time.perf_counter() - start
        seconds += elapsed
        rates.append(steps * dataset.batch_size / elapsed)
    return BareRun(net, rates, len(targets), seconds)


def split_auroc_of_net(net: torch.nn.Module, config: ExperimentConfig) -> float:
    """AUROC on the spec's test split of a model in memory (eval mode, batches of 64)."""
    return _test_auroc(TorchPredictor(net, InputGeometry.from_config(config.dataset)), config)


def split_auroc_of_checkpoint(path: Path, config: ExperimentConfig) -> float:
    """The same AUROC for a ``.pth`` that ``oi-ray train`` wrote."""
    model = open_model_file(path, config.encryption_key, ModelCard.expected_by(config))
    return _test_auroc(model.load(), config)


def _test_auroc(predictor, config: ExperimentConfig) -> float:
    geometry = InputGeometry.from_config(config.dataset)
    table = load_split(config.dataset, "test_dataset")
    distances = np.concatenate([
        predictor.distances(read_pictures(table.test_paths[start:start + 64], geometry),
                            read_pictures(table.golden_paths[start:start + 64], geometry))
        for start in range(0, len(table), 64)])
    return auroc(distances, table.targets)
