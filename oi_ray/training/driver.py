"""The driver's side of a training run, shared by ``oi-ray train`` and every sweep trial:
where to resume, the splits, the job and its Ray Train trainer, and how an early end reads."""

import logging
import secrets
from pathlib import Path

from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from oi_ray import storage
from oi_ray.checkpoint import LATEST_NAME, check_fits, epoch_checkpoint_name, load_checkpoint
from oi_ray.config import save_resolved_spec
from oi_ray.config.schema import ExperimentConfig
from oi_ray.data.dataset import DecodedCache, PipelineSpec
from oi_ray.data.pairs import PairTable, load_split
from oi_ray.errors import ConfigError, DataError, TaskInterrupted, TrainingDivergedError
from oi_ray.launch.shared_paths import SharedPath
from oi_ray.model.registry import Architecture
from oi_ray.training.early_end import EarlyEnd, Stopped
from oi_ray.training.job import TrainJob
from oi_ray.training.progress import ProgressFeed
from oi_ray.training.worker import train_worker

log = logging.getLogger("oi_ray.tasks.train")


def resume_point(config: ExperimentConfig, results_dir: str) -> tuple[str | None, int]:
    """The checkpoint to continue from (a path or URI) and its epoch, checked against the spec's model."""
    explicit = config.train.resume_training_checkpoint_path
    path = storage.absolute(explicit) if explicit else storage.join(results_dir, LATEST_NAME)
    if storage.file_size(path) is None:
        if not explicit:
            return None, 0
        raise ConfigError(f"train.resume_training_checkpoint_path={explicit!r}: no such file")
    checkpoint = load_checkpoint(path, config.encryption_key)  # memory-mapped: no weights read
    check_fits(checkpoint, path, Architecture.of_spec(config))
    return path, checkpoint.epoch


def load_tables(config: ExperimentConfig) -> tuple[PairTable, PairTable | None]:
    """The training split and the validation split (None, with a warning, when it is not set)."""
    dataset = config.dataset
    if not dataset.train_dataset.is_set:
        raise ConfigError("dataset.train_dataset.csv_path is not set (nor dataset.train_dataset.shards)")
    train_table = load_split(dataset, "train_dataset")
    if not dataset.validation_dataset.is_set:
        log.warning("dataset.validation_dataset is not set: no validation metrics and no calibrated "
                    "threshold (evaluate and inference will decide with model.margin)")
        return train_table, None
    return train_table, load_split(dataset, "validation_dataset")


def check_batches(pairs: int, source: str | Path, batch_size: int, workers: int) -> None:
    """Refuse a training split (``pairs`` read from ``source``) too small for one batch per worker."""
    per_worker = pairs // workers
    if per_worker < batch_size:
        raise DataError(
            f"{source}: {pairs} training pairs give each of {workers} worker(s) "
            f"{per_worker} pairs, less than one batch of dataset.batch_size={batch_size} "
            f"(incomplete batches are dropped); lower dataset.batch_size or add pairs")


def shared_images(train_table: PairTable) -> SharedPath:
    """The training images, as every node must see them: the split's first image (or shard)
    stands for them."""
    if train_table.shards is not None:
        return SharedPath("dataset.train_dataset.shards", train_table.shards.files[0], is_folder=False)
    return SharedPath("dataset.train_dataset.images_dir", train_table.test_paths[0][0], is_folder=False)


def prepare_job(config: ExperimentConfig, pipeline: PipelineSpec, train_cache: DecodedCache,
                validation_cache: DecodedCache | None, results_dir: str, resume_from: str | None,
                threads: int) -> TrainJob:
    """The job every worker runs, and its results folder made ready (leftovers of an
    interrupted run removed, the resolved spec saved)."""
    results_dir = storage.output_folder(results_dir)
    for leftover in storage.remove_partial_files(results_dir):
        log.info("removed %s, a partial file an interrupted run left", leftover)
    save_resolved_spec(config, results_dir)
    seed = config.train.seed
    return TrainJob(config=config, pipeline=pipeline, train_cache=train_cache,
                    validation_cache=validation_cache, results_dir=results_dir, resume_from=resume_from,
                    threads=threads, progress=ProgressFeed(),
                    data_seed=seed if seed >= 0 else secrets.randbelow(2**31))


def make_trainer(job: TrainJob, workers: int, use_gpu: bool, run_config: RunConfig) -> TorchTrainer:
    """The Ray Train ``TorchTrainer`` of ``job`` (what ``oi-ray train`` and every sweep trial fit)."""
    return TorchTrainer(train_worker, train_loop_config={"job": job},
                        scaling_config=_scaling(job.config, workers, use_gpu), run_config=run_config)


def rerun_note(config: ExperimentConfig, results_dir: str) -> str:
    """Where a rerun of the same command continues from."""
    latest, newest = storage.join(results_dir, LATEST_NAME), None
    if storage.file_size(latest) is not None:
        done = load_checkpoint(latest, config.encryption_key).epoch
        newest = (f"{LATEST_NAME} -> {epoch_checkpoint_name(done)} ({done} of {config.train.num_epochs} "
                  "epochs done)")
    explicit = config.train.resume_training_checkpoint_path
    if explicit:
        return (f"a rerun of the same command starts again from train.resume_training_checkpoint_path="
                f"{explicit}" + (f"; drop that key to continue from {newest}" if newest else ""))
    if newest:
        return f"a rerun of the same command resumes from {storage.join(results_dir, newest)}"
    return "no checkpoint was written yet: a rerun starts from epoch 1"


def early_end_error(end: EarlyEnd, config: ExperimentConfig, results_dir: str) -> Exception:
    """The error for a run the workers ended before its last epoch."""
    if isinstance(end, Stopped):
        return TaskInterrupted(f"stopped during epoch {end.epoch}; {rerun_note(config, results_dir)}")
    optim = config.train.optim
    return TrainingDivergedError(
        f"training diverged: the loss became NaN or infinite at epoch {end.epoch}, step {end.step} of "
        f"{end.steps}; nothing of epoch {end.epoch} was saved, and {rerun_note(config, results_dir)}. Try a "
        f"lower train.optim.lr (now {optim.lr:g}) or set train.clip_grad_norm (e.g. 1.0)")


def _scaling(config: ExperimentConfig, workers: int, use_gpu: bool) -> ScalingConfig:
    resources = {"CPU": config.ray.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = config.ray.gpus_per_worker
    return ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources)
