"""What every Ray Train worker runs: TAO's Siamese training, epoch by epoch.

Each epoch every rank computes the same plan (fresh fpratio resample and shuffle, from the
seed and the epoch) and trains on its own equal share of it, gathered from the decoded cache,
so all ranks run the same number of steps (``epoch.EpochRunner``); an early end (Ctrl-C, a
non-finite loss) reaches every rank at the same step, before any checkpoint of that epoch is
written. Rank 0 alone validates, calibrates the threshold, appends ``status.json``, logs to
TensorBoard and writes the epoch's checkpoint.
"""

import os
import time
from typing import Any

import ray.train
import ray.train.torch
import torch

from oi_ray.config.schema import CuDNNConfig
from oi_ray.data.epochs import CacheReader, epoch_plan, training_batches
from oi_ray.model.inputs import InputNormalizer, LightingGain
from oi_ray.model.registry import Architecture
from oi_ray.training.checkpointing import epoch_checkpoint, report_with_checkpoint, restore
from oi_ray.training.epoch import EpochRunner
from oi_ray.training.job import TrainJob
from oi_ray.training.status import append_status
from oi_ray.training.step import Precision, StepRule, load_optimizer_state, make_optimizer
from oi_ray.training.tensorboard import TensorBoardLog
from oi_ray.training.validation import validate

CUBLAS_REPRODUCIBLE_WORKSPACE = ":4096:8"  # cuBLAS's documented setting for reproducible results


class PairDistance(torch.nn.Module):
    """``forward`` = the model's pair distance, so DDP's hooks see the whole computation."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, test: torch.Tensor, golden: torch.Tensor) -> torch.Tensor:
        return self.net.distance(test, golden)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: train ``job`` from its start epoch to the end."""
    job: TrainJob = loop_config["job"]
    config, train = job.config, job.config.train
    torch.set_num_threads(job.threads)
    device = ray.train.torch.get_device()
    choose_algorithms(train.cudnn, device)
    if train.seed >= 0:
        torch.manual_seed(train.seed)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    lead = rank == 0

    architecture = Architecture.of(config.model, job.pipeline.geometry)
    net = architecture.build()
    state, restarted = restore(net, architecture, resume_from=job.resume_from,
                               pretrained=train.pretrained_model_path, key=config.encryption_key)
    if lead and restarted:
        job.progress.note(f"worker group restarted: continuing after epoch {state.epoch} "
                          f"from the last Ray Train checkpoint")
    net.to(device)
    if train.channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(net.parameters(), train.optim)
    if state.optimizer_state is not None:
        load_optimizer_state(optimizer, state.optimizer_state)
    batch_size = config.dataset.batch_size
    runner = EpochRunner(
        model=ray.train.torch.prepare_model(PairDistance(net), move_to_device=False), optimizer=optimizer,
        rule=StepRule.of(config), precision=Precision(device, train.mixed_precision),
        normalize=InputNormalizer(job.pipeline.geometry, device, channels_last=train.channels_last,
                                  gain=LightingGain.of(config.dataset, seed=(job.data_seed, rank))),
        batch_size=batch_size, progress=job.progress if lead else None, world=world)
    reader = CacheReader(job.train_cache)
    board = TensorBoardLog(job.results_dir, train.tensorboard.infrequent_logging_frequency) \
        if lead and train.tensorboard.enabled else None

    threshold, last_validation = state.threshold, state.extra.get("validation")
    for epoch in range(state.epoch + 1, train.num_epochs + 1):
        start = time.perf_counter()
        rows = epoch_plan(job.train_cache.targets, job.pipeline.fpratio_sampling, seed=job.data_seed,
                          epoch=epoch - 1, world=world, batch_size=batch_size)[rank]
        batches = training_batches(job.train_cache, reader, rows, job.pipeline, batch_size=batch_size,
                                   seed=(job.data_seed, epoch, rank))
        net.train()
        outcome = runner.run(batches, epoch, steps=len(rows) // batch_size)
        if outcome.ended is not None:  # every rank got the same answer from the same check
            if lead:
                job.progress.ended_early(outcome.ended)
            break
        metrics = {"epoch": epoch, "train_loss": outcome.mean_loss,
                   "pairs_per_s": outcome.steps * batch_size * world / (time.perf_counter() - start)}
        last_epoch = epoch == train.num_epochs
        validating = epoch % train.validation_interval == 0 or last_epoch
        if lead and job.validation_cache is not None and validating:
            last_validation = validate(net, job.validation_cache, job.pipeline.geometry,
                                       margin=config.model.margin, calibration=train.calibration,
                                       batch_size=batch_size, device=device,
                                       channels_last=train.channels_last)
            threshold = last_validation["threshold"]
            metrics.update(last_validation)
        metrics["seconds"] = time.perf_counter() - start
        if lead:
            append_status(job.results_dir, metrics)
            job.progress.epoch_done(metrics, train.num_epochs)
            if board is not None:
                board.epoch_done(metrics, net)
        if lead and (epoch % train.checkpoint_interval == 0 or last_epoch):
            saved = epoch_checkpoint(net, optimizer, epoch, config, architecture, threshold,
                                     {"validation": last_validation, "train_loss": metrics["train_loss"]})
            report_with_checkpoint(metrics, saved, job.results_dir, config.encryption_key)
        else:
            ray.train.report(metrics)
    if board is not None:
        board.close()


def choose_algorithms(cudnn: CuDNNConfig, device: torch.device) -> None:
    """TAO's ``train.cudnn`` keys; ``deterministic`` on a GPU also asks PyTorch for its
    deterministic algorithms (a seeded run then repeats bit for bit; an operation that has none
    warns once) and cuBLAS for its reproducible workspace, before this worker's first product."""
    torch.backends.cudnn.benchmark = cudnn.benchmark
    torch.backends.cudnn.deterministic = cudnn.deterministic
    on_gpu = cudnn.deterministic and device.type == "cuda"
    if on_gpu:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_REPRODUCIBLE_WORKSPACE)
    torch.use_deterministic_algorithms(on_gpu, warn_only=True)
