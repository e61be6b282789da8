"""``oi-ray train``: validate inputs, decide where to resume, run the Ray Train job.

Everything a user can get wrong (spec, CSVs, images, resume checkpoint, batch size against
the number of workers) is checked here, before any Ray work starts. A rerun continues from
``oi_model_latest.pth`` in ``train.results_dir`` (``train.resume_training_checkpoint_path``
wins), so only the remaining epochs run.
"""

import json
import logging
import secrets
import time
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from oi_ray.checkpoint import LATEST_NAME, check_fits, load_checkpoint
from oi_ray.config import save_resolved_spec
from oi_ray.config.schema import ExperimentConfig
from oi_ray.data.dataset import DecodedCache, PipelineSpec, decode_cache
from oi_ray.data.pairs import PairTable, load_split
from oi_ray.errors import ConfigError, DataError, TaskInterrupted, TrainingDivergedError
from oi_ray.fileio import remove_partial_files
from oi_ray.launch.shared_paths import SharedPath, check_shared, worker_nodes
from oi_ray.model.registry import Architecture
from oi_ray.runtime import ray_session, torch_threads, uses_gpus
from oi_ray.training.loop import STATUS_FILE, TrainJob, train_worker
from oi_ray.training.progress import ProgressFeed

log = logging.getLogger(__name__)


def run(config: ExperimentConfig) -> None:
    """Train ``config`` on Ray Train, resuming where the last run stopped."""
    train = config.train
    results_dir = Path(train.results_dir).resolve()
    resume_from, done_epochs = resume_point(config, results_dir)
    if done_epochs >= train.num_epochs:
        log.info("training already complete: %s holds epoch %d of %d; nothing to do "
                 "(raise train.num_epochs to train longer)", resume_from, done_epochs, train.num_epochs)
        return
    train_table, validation_table = load_tables(config)

    pipeline = PipelineSpec.from_config(config.dataset)
    try:
        with ray_session(config.ray):
            job = _fit(config, pipeline, train_table, validation_table, results_dir, resume_from, done_epochs)
    except KeyboardInterrupt:  # a second Ctrl-C (or one before training started): stopped at once
        remove_partial_files(results_dir)
        raise TaskInterrupted(f"interrupted; {rerun_note(config, results_dir)}") from None
    if job.progress.early_end is not None:
        raise early_end_error(job.progress.early_end, config, results_dir)
    latest, status = results_dir / LATEST_NAME, results_dir / STATUS_FILE
    last_epoch = json.loads(status.read_text().splitlines()[-1])  # the final epoch is always validated
    threshold = f"{last_epoch['threshold']:.4f}" if "threshold" in last_epoch \
        else "none (no validation set; model.margin decides)"
    log.info("done: %s -> %s (epoch %d), calibrated threshold %s; per-epoch metrics in %s",
             latest, latest.resolve().name, last_epoch["epoch"], threshold, status)


def _fit(config: ExperimentConfig, pipeline: PipelineSpec, train_table: PairTable,
         validation_table: PairTable | None, results_dir: Path, resume_from: Path | None,
         done_epochs: int) -> TrainJob:
    """Decode the splits once, then run the Ray Train job (inside a Ray session)."""
    train = config.train
    use_gpu = uses_gpus(config.ray)
    workers = config.ray.num_workers or (train.num_gpus if use_gpu else 1)
    check_batches(len(train_table), train_table.csv_path, config.dataset.batch_size, workers)
    if pipeline.augmentation is not None:
        _check_cpus(config, workers)
    check_shared(shared_training_paths(config, results_dir, train_table),
                 worker_nodes(config.ray.cpus_per_worker, config.ray.gpus_per_worker if use_gpu else 0))
    log.info("training %s on %d %s worker(s): epochs %d to %d, %d training pairs%s; results in %s",
             config.model.model_type, workers, "GPU" if use_gpu else "CPU", done_epochs + 1,
             train.num_epochs, len(train_table), _validation_note(validation_table), results_dir)
    if resume_from is not None:
        log.info("resuming from %s (epoch %d)", resume_from, done_epochs)
    job = prepare_job(config, pipeline, decode_cache(train_table, pipeline, for_training=True),
                      decode_cache(validation_table, pipeline, for_training=False)
                      if validation_table is not None else None,
                      results_dir, resume_from, torch_threads(config.ray, workers))
    trainer = make_trainer(job, workers, use_gpu, RunConfig(
        # a job's id: resubmitting the job resumes this Ray Train run
        name=config.ray.job_id or f"train-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=str(Path(config.ray.storage_path).resolve()),
        failure_config=FailureConfig(max_failures=config.ray.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=1)))
    job.progress.render_while(trainer.fit)
    return job


def prepare_job(config: ExperimentConfig, pipeline: PipelineSpec, train_cache: DecodedCache,
                validation_cache: DecodedCache | None, results_dir: Path, resume_from: Path | None,
                threads: int) -> TrainJob:
    """The job every worker runs, and its results folder made ready (leftovers of an
    interrupted run removed, the resolved spec saved)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    for leftover in remove_partial_files(results_dir):
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


def rerun_note(config: ExperimentConfig, results_dir: Path) -> str:
    """Where a rerun of the same command continues from."""
    latest, newest = results_dir / LATEST_NAME, None
    if latest.exists():
        done = load_checkpoint(latest, config.encryption_key).epoch
        newest = f"{LATEST_NAME} -> {latest.resolve().name} ({done} of {config.train.num_epochs} epochs done)"
    explicit = config.train.resume_training_checkpoint_path
    if explicit:
        return (f"a rerun of the same command starts again from train.resume_training_checkpoint_path="
                f"{explicit}" + (f"; drop that key to continue from {newest}" if newest else ""))
    if newest:
        return f"a rerun of the same command resumes from {results_dir / newest}"
    return "no checkpoint was written yet: a rerun starts from epoch 1"


def early_end_error(reason: tuple, config: ExperimentConfig, results_dir: Path) -> Exception:
    """The error for a run the workers ended before its last epoch."""
    if reason[0] == "stopped":
        return TaskInterrupted(f"stopped during epoch {reason[1]}; {rerun_note(config, results_dir)}")
    _, epoch, step, steps = reason
    optim = config.train.optim
    return TrainingDivergedError(
        f"training diverged: the loss became NaN or infinite at epoch {epoch}, step {step} of {steps}; "
        f"nothing of epoch {epoch} was saved, and {rerun_note(config, results_dir)}. Try a lower "
        f"train.optim.lr (now {optim.lr:g}) or set train.clip_grad_norm (e.g. 1.0)")


def shared_training_paths(config: ExperimentConfig, results_dir: Path,
                          train_table: PairTable) -> list[SharedPath]:
    """What every node that may host a training worker must see: where rank 0 writes, Ray
    Train's storage, and the images (the first of the training split stands for them)."""
    return [SharedPath("train.results_dir", str(results_dir), is_folder=True),
            SharedPath("ray.storage_path", config.ray.storage_path, is_folder=True),
            shared_images(train_table)]


def shared_images(train_table: PairTable) -> SharedPath:
    """The training images, as every node must see them: the split's first image stands for them."""
    return SharedPath("dataset.train_dataset.images_dir", train_table.test_paths[0][0], is_folder=False)


def resume_point(config: ExperimentConfig, results_dir: Path) -> tuple[Path | None, int]:
    """The checkpoint to continue from and its epoch, checked against the spec's model."""
    explicit = config.train.resume_training_checkpoint_path
    path = Path(explicit) if explicit else results_dir / LATEST_NAME
    if not explicit and not path.exists():
        return None, 0
    if not path.is_file():
        raise ConfigError(f"train.resume_training_checkpoint_path={explicit!r}: no such file")
    checkpoint = load_checkpoint(path, config.encryption_key)  # memory-mapped: no weights read
    check_fits(checkpoint, path, Architecture.of_spec(config))
    return path, checkpoint.epoch


def load_tables(config: ExperimentConfig) -> tuple[PairTable, PairTable | None]:
    dataset = config.dataset
    if not dataset.train_dataset.csv_path:
        raise ConfigError("dataset.train_dataset.csv_path is not set")
    train_table = load_split(dataset, "train_dataset")
    if not dataset.validation_dataset.csv_path:
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


def _check_cpus(config: ExperimentConfig, workers: int) -> None:
    """Training augmentation runs in Ray Data tasks, which need CPUs beside the workers, or
    training hangs."""
    total = ray.cluster_resources().get("CPU", 0)
    needed = workers * config.ray.cpus_per_worker
    if needed >= total:
        raise ConfigError(
            f"{workers} worker(s) x ray.cpus_per_worker={config.ray.cpus_per_worker} = {needed:g} CPUs "
            f"leave none of the cluster's {total:g} for Ray Data's augmentation tasks; lower "
            f"ray.num_workers or ray.cpus_per_worker, or raise ray.num_cpus")


def _scaling(config: ExperimentConfig, workers: int, use_gpu: bool) -> ScalingConfig:
    resources = {"CPU": config.ray.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = config.ray.gpus_per_worker
    return ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources)


def _validation_note(table: PairTable | None) -> str:
    return f", {len(table)} validation pairs" if table is not None else ", no validation set"
