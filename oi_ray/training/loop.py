"""What every Ray Train worker runs: TAO's Siamese training loop, validation and checkpoints.

Each epoch every rank computes the same plan (fresh fpratio resample and shuffle, from the
seed and the epoch) and trains on its own equal share of it, gathered from the decoded cache,
so all ranks run the same number of steps. Every few steps the ranks agree (one small
all-reduce on their device) on whether to go on: a non-finite loss on any rank, or a stop
asked for with Ctrl-C, ends the run on every rank at the same step, before any checkpoint of
that epoch is written. Rank 0 alone validates, calibrates the threshold and writes
``model_epoch_NNN.pth``; the same file is the Ray Train checkpoint that a restarted worker
group resumes from.
"""

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from oi_ray.checkpoint import (
    Checkpoint,
    epoch_checkpoint_path,
    load_checkpoint,
    load_weights,
    point_latest_to,
    save_checkpoint,
)
from oi_ray.config import to_yaml
from oi_ray.config.schema import CuDNNConfig, ExperimentConfig, OptimConfig
from oi_ray.data.dataset import DecodedCache, PipelineSpec
from oi_ray.data.epochs import CacheReader, batches_of, epoch_plan, training_batches
from oi_ray.metrics import at_defect_recall, auroc, calibrate, describe_rule, tao_metrics
from oi_ray.model.inputs import InputNormalizer
from oi_ray.model.loss import contrastive_loss
from oi_ray.model.registry import Architecture
from oi_ray.predictors import TorchPredictor
from oi_ray.scoring import score_batches
from oi_ray.training.progress import ProgressFeed
from oi_ray.training.schedule import learning_rate, set_learning_rate, training_progress

RAY_CHECKPOINT_FILE = "checkpoint.pth"
STATUS_FILE = "status.json"
TENSORBOARD_DIR = "tensorboard"
CHECK_EVERY_STEPS = 10  # ranks agree on going on, rank 0 updates the progress bar (one host sync)
RECALL_TARGET = 0.99
CUBLAS_REPRODUCIBLE_WORKSPACE = ":4096:8"  # cuBLAS's documented setting for reproducible results


@dataclass
class TrainJob:
    """Everything the workers need, built once by the driver."""

    config: ExperimentConfig
    pipeline: PipelineSpec
    train_cache: DecodedCache
    validation_cache: DecodedCache | None
    results_dir: Path
    resume_from: Path | None  # .pth to continue from (oi_model_latest.pth or the spec's path)
    threads: int
    progress: ProgressFeed
    data_seed: int  # seeds the epoch plans: train.seed, or one drawn by the driver when it is -1


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
    _choose_algorithms(train.cudnn, device)
    if train.seed >= 0:
        torch.manual_seed(train.seed)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    architecture = Architecture.of(config.model, job.pipeline.geometry)
    net = architecture.build()
    state = _restore(net, job)
    if rank == 0 and ray.train.get_checkpoint() is not None:
        job.progress.note(f"worker group restarted: continuing after epoch {state.epoch} "
                          f"from the last Ray Train checkpoint")
    net.to(device)
    if train.channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(net.parameters(), train.optim)
    if state.optimizer_state is not None:
        _load_optimizer_state(optimizer, state.optimizer_state)
    batch_size = config.dataset.batch_size
    runner = _EpochRunner(
        model=ray.train.torch.prepare_model(PairDistance(net), move_to_device=False), net=net,
        optimizer=optimizer, precision=_Precision(device, train.mixed_precision),
        normalize=InputNormalizer(job.pipeline.geometry, device, channels_last=train.channels_last),
        config=config, progress=job.progress if rank == 0 else None, world=world,
    )
    reader = CacheReader(job.train_cache)
    board = _TensorBoard(job.results_dir, train.tensorboard.infrequent_logging_frequency) \
        if rank == 0 and train.tensorboard.enabled else None

    threshold, last_validation = state.threshold, state.extra.get("validation")
    for epoch in range(state.epoch + 1, train.num_epochs + 1):
        start = time.perf_counter()
        rows = epoch_plan(job.train_cache.targets, job.pipeline.fpratio_sampling, seed=job.data_seed,
                          epoch=epoch - 1, world=world, batch_size=batch_size)[rank]
        batches = training_batches(job.train_cache, reader, rows, job.pipeline, batch_size=batch_size,
                                   seed=(job.data_seed, epoch, rank))
        outcome = runner.run(batches, epoch, steps=len(rows) // batch_size)
        if outcome.ended is not None:  # every rank got the same answer from the same check
            if rank == 0:
                job.progress.ended_early(*outcome.ended)
            break
        metrics = {"epoch": epoch, "train_loss": outcome.mean_loss,
                   "pairs_per_s": outcome.steps * batch_size * world / (time.perf_counter() - start)}
        last_epoch = epoch == train.num_epochs
        if rank == 0 and job.validation_cache is not None and (
                epoch % train.validation_interval == 0 or last_epoch):
            last_validation = validate(net, job, device)
            threshold = last_validation["threshold"]
            metrics.update(last_validation)
        metrics["seconds"] = time.perf_counter() - start
        if rank == 0:
            _append_status(job.results_dir, metrics)
            job.progress.epoch_done(metrics, train.num_epochs)
            if board is not None:
                board.epoch_done(metrics, net)
        if rank == 0 and (epoch % train.checkpoint_interval == 0 or last_epoch):
            saved = Checkpoint(
                model_state=net.state_dict(), epoch=epoch, optimizer_state=optimizer.state_dict(),
                config_yaml=to_yaml(config), threshold=threshold,
                threshold_rule=describe_rule(train.calibration) if threshold is not None else None,
                model_type=architecture.model_type,
                input_shape=architecture.input_shape, embedding_dim=architecture.embedding_dim,
                model_options=dict(architecture.options),
                extra={"validation": last_validation, "train_loss": metrics["train_loss"]},
            )
            _report_with_checkpoint(metrics, saved, job.results_dir, config.encryption_key)
        else:
            ray.train.report(metrics)
    if board is not None:
        board.close()


@dataclass(frozen=True)
class EpochOutcome:
    """What one epoch's optimisation steps gave, the same on every rank."""

    steps: int
    mean_loss: float  # over every rank's steps
    ended: tuple | None  # ("stopped", epoch) or ("diverged", epoch, step, steps): end the run


@dataclass
class _EpochRunner:
    """Runs one epoch of optimisation steps; the host syncs only at the periodic checks."""

    model: torch.nn.Module  # PairDistance, DDP-wrapped when world > 1
    net: torch.nn.Module  # the model itself (its ``distance``)
    optimizer: torch.optim.Optimizer
    precision: "_Precision"
    normalize: InputNormalizer
    config: ExperimentConfig
    progress: ProgressFeed | None  # rank 0 only
    world: int

    def run(self, batches: Iterator[dict[str, np.ndarray]], epoch: int, steps: int) -> EpochOutcome:
        """Train on ``steps`` batches unless the ranks agree to end the run early."""
        self.net.train()
        device, batch_size = self.normalize.device, self.config.dataset.batch_size
        loss_sum = torch.zeros((), device=device)
        healthy = torch.ones((), dtype=torch.bool, device=device)  # every loss so far was finite
        healthy_steps = torch.zeros((), dtype=torch.int64, device=device)
        step = 0
        optim, num_epochs = self.config.train.optim, self.config.train.num_epochs
        for step, batch in enumerate(batches, start=1):
            set_learning_rate(self.optimizer, learning_rate(optim, training_progress(epoch, step - 1, steps,
                                                                                     num_epochs)))
            target = torch.from_numpy(batch["target"].copy()).to(device, non_blocking=True)
            with self.precision.autocast():
                distance = self.model(self.normalize(batch["test"]), self.normalize(batch["golden"]))
            loss = contrastive_loss(distance.float(), target, self.config.model.margin)
            self.optimizer.zero_grad(set_to_none=True)
            self.precision.backward_and_step(loss, self.optimizer, self.net, self.config.train.clip_grad_norm)
            loss = loss.detach()
            loss_sum += loss
            healthy &= torch.isfinite(loss)
            healthy_steps += healthy
            if step % CHECK_EVERY_STEPS == 0 or step == steps:
                if self.progress is not None:
                    self.progress.step(epoch, step * batch_size * self.world, steps * batch_size * self.world,
                                       loss.item())
                ended = self._agree_to_end(healthy, healthy_steps, epoch, steps)
                if ended is not None:
                    return EpochOutcome(step, float("nan"), ended)
        return EpochOutcome(step, _mean_over_ranks(loss_sum, step, self.world), None)

    def _agree_to_end(self, healthy: torch.Tensor, healthy_steps: torch.Tensor, epoch: int,
                      steps: int) -> tuple | None:
        """One all-reduce (on this rank's device) of: a non-finite loss anywhere, the first step
        that had one, and a stop request (rank 0 asks the driver). Same answer on every rank.

        The first bad step travels negated so that MAX finds the earliest: a healthy rank's
        ``-(steps so far + 1)`` is below every bad rank's ``-first_bad``.
        """
        stop = self.progress is not None and self.progress.stop_requested()
        flags = torch.stack([(~healthy).to(torch.float64), -(healthy_steps + 1).to(torch.float64),
                             healthy.new_tensor(float(stop), dtype=torch.float64)])
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        diverged, first_bad, stopped = flags.tolist()
        if diverged:
            return ("diverged", epoch, int(-first_bad), steps)
        if stopped:
            return ("stopped", epoch)
        return None


def make_optimizer(parameters, optim: OptimConfig) -> torch.optim.Optimizer:
    """TAO's rule: ``Adam`` -> Adam(lr) without weight decay; ``SGD`` -> SGD(lr, momentum, wd)."""
    if optim.type == "Adam":
        return torch.optim.Adam(parameters, lr=optim.lr)
    return torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def _load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Restore the saved moments and step counts, keeping the spec's hyperparameters: a rerun
    with a new ``train.optim.lr`` trains with it (``load_state_dict`` alone would restore the old one)."""
    from_spec = [{key: value for key, value in group.items() if key != "params"}
                 for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, hyperparameters in zip(optimizer.param_groups, from_spec, strict=True):
        group.update(hyperparameters)


def validate(net: torch.nn.Module, job: TrainJob, device: torch.device) -> dict[str, Any]:
    """Loss and metrics on the validation set; the threshold is calibrated by the spec's
    ``train.calibration`` rule. TAO's KPIs (``val_acc``, ``val_fpr``) use ``model.margin``."""
    margin = job.config.model.margin
    predictor = TorchPredictor(net, job.pipeline.geometry, device=device,
                               channels_last=job.config.train.channels_last)
    reader = CacheReader(job.validation_cache)
    scores = score_batches(predictor, batches_of(reader, np.arange(len(reader)), job.pipeline.geometry,
                                                 batch_size=job.config.dataset.batch_size))
    distances, targets = scores.distances, scores.targets
    tao = tao_metrics(distances, targets, margin)
    calibrated = calibrate(distances, targets, job.config.train.calibration)
    at_recall = at_defect_recall(distances, targets, RECALL_TARGET)
    loss = contrastive_loss(torch.from_numpy(distances), torch.from_numpy(targets), margin)
    return {
        "val_loss": float(loss), "val_acc": tao["total_accuracy"], "val_fpr": tao["false_alarm"],
        "val_auroc": auroc(distances, targets), "threshold": calibrated.threshold,
        # oi-ray's own rates at the calibrated threshold, named as metrics.json names them
        "val_defect_recall_fraction_of_defects": calibrated.defect_recall,
        "val_false_alarm_fraction_of_pass_pairs": calibrated.false_alarm_rate,
        "val_false_alarm_fraction_of_pass_pairs_at_99_defect_recall": at_recall.false_alarm_rate,
    }


class _Precision:
    """Optional autocast (bf16 on CPU, fp16 with gradient scaling on CUDA) and the optimizer step."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device_type = device.type
        self.enabled = enabled
        self.dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled and device.type == "cuda")

    def autocast(self) -> AbstractContextManager:
        if not self.enabled:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                          net: torch.nn.Module, clip_grad_norm: float) -> None:
        self.scaler.scale(loss).backward()
        if clip_grad_norm > 0:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()


def _choose_algorithms(cudnn: CuDNNConfig, device: torch.device) -> None:
    """TAO's ``train.cudnn`` keys; ``deterministic`` on a GPU also asks PyTorch for its
    deterministic algorithms (a seeded run then repeats bit for bit; an operation that has none
    warns once) and cuBLAS for its reproducible workspace, before this worker's first product."""
    torch.backends.cudnn.benchmark = cudnn.benchmark
    torch.backends.cudnn.deterministic = cudnn.deterministic
    on_gpu = cudnn.deterministic and device.type == "cuda"
    if on_gpu:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_REPRODUCIBLE_WORKSPACE)
    torch.use_deterministic_algorithms(on_gpu, warn_only=True)


def _restore(net: torch.nn.Module, job: TrainJob) -> Checkpoint:
    """Weights and progress to start from: the Ray Train checkpoint after a worker-group
    restart, else the run's resume file, else pretrained weights (epoch 0), else fresh."""
    config, key = job.config, job.config.encryption_key
    ray_checkpoint = ray.train.get_checkpoint()
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as folder:
            path = Path(folder) / RAY_CHECKPOINT_FILE
            checkpoint = load_checkpoint(path, key)
    elif job.resume_from is not None:
        path, checkpoint = job.resume_from, load_checkpoint(job.resume_from, key)
    elif config.train.pretrained_model_path:
        path = Path(config.train.pretrained_model_path)
        weights = load_checkpoint(path, key)
        checkpoint = Checkpoint(model_state=weights.model_state, model_type=weights.model_type,
                                input_shape=weights.input_shape, model_options=weights.model_options)
    else:
        return Checkpoint(model_state=net.state_dict())
    load_weights(net, checkpoint, path, Architecture.of(config.model, job.pipeline.geometry))
    return checkpoint


def _mean_over_ranks(loss_sum: torch.Tensor, steps: int, world: int) -> float:
    """The mean loss over every rank's steps, all-reduced on the loss's own device (NCCL needs it)."""
    totals = torch.stack([loss_sum.detach().double(), loss_sum.new_tensor(float(steps), dtype=torch.float64)])
    if world > 1:
        dist.all_reduce(totals)
    total_loss, total_steps = totals.tolist()
    return total_loss / total_steps if total_steps > 0 else float("nan")


def _report_with_checkpoint(metrics: dict[str, Any], checkpoint: Checkpoint, results_dir: Path,
                            key: str | None) -> None:
    """Write ``model_epoch_NNN.pth``, repoint ``oi_model_latest.pth``, report it to Ray Train."""
    path = epoch_checkpoint_path(results_dir, checkpoint.epoch)
    save_checkpoint(checkpoint, path, key)
    point_latest_to(path)
    with tempfile.TemporaryDirectory(prefix="oi-ray-ckpt-") as folder:
        staged = Path(folder) / RAY_CHECKPOINT_FILE
        try:
            os.link(path, staged)
        except OSError:  # another file system
            shutil.copyfile(path, staged)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


class _TensorBoard:
    """TensorBoard event files under ``train.results_dir/tensorboard`` (rank 0): every numeric
    per-epoch metric as a scalar, and weight histograms every ``histogram_every`` epochs."""

    def __init__(self, results_dir: Path, histogram_every: int) -> None:
        from tensorboardX import SummaryWriter  # installed with ray[tune]

        self.writer = SummaryWriter(logdir=str(results_dir / TENSORBOARD_DIR))
        self.histogram_every = max(1, histogram_every)

    def epoch_done(self, metrics: dict[str, Any], net: torch.nn.Module) -> None:
        epoch = metrics["epoch"]
        for name, value in metrics.items():
            if name != "epoch" and isinstance(value, int | float):
                self.writer.add_scalar(name, value, epoch)
        if epoch % self.histogram_every == 0:
            for name, parameter in net.named_parameters():
                self.writer.add_histogram(f"weights/{name}", parameter.detach().float().cpu().numpy(), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _append_status(results_dir: Path, metrics: dict[str, Any]) -> None:
    """One JSON line per epoch in ``status.json`` (TAO's KPI log), written with one append."""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **metrics}) + "\n"
    with open(results_dir / STATUS_FILE, "a", encoding="utf-8") as status:
        status.write(line)
