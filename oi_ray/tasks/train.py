"""``oi-ray train``: validate inputs, decide where to resume, run the Ray Train job.

Everything a user can get wrong (spec, CSVs, images, resume checkpoint, batch size against
the number of workers) is checked here, before any Ray work starts. A rerun continues from
``oi_model_latest.pth`` in ``train.results_dir`` (``train.resume_training_checkpoint_path``
wins), so only the remaining epochs run.
"""

import logging
import time

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig

from oi_ray import storage
from oi_ray.checkpoint import LATEST_NAME, epoch_checkpoint_name
from oi_ray.config.schema import ExperimentConfig
from oi_ray.data.dataset import PipelineSpec, decode_cache
from oi_ray.data.pairs import PairTable
from oi_ray.errors import ConfigError, TaskInterrupted
from oi_ray.launch.shared_paths import SharedPath, check_shared, worker_nodes
from oi_ray.runtime import ray_session, torch_threads, uses_gpus
from oi_ray.training.driver import (
    check_batches,
    early_end_error,
    load_tables,
    make_trainer,
    prepare_job,
    rerun_note,
    resume_point,
    shared_images,
)
from oi_ray.training.job import TrainJob
from oi_ray.training.status import STATUS_FILE, status_lines

log = logging.getLogger(__name__)


def run(config: ExperimentConfig) -> None:
    """Train ``config`` on Ray Train, resuming where the last run stopped."""
    train = config.train
    results_dir = storage.absolute(train.results_dir)
    _check_tensorboard(config, results_dir)
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
        storage.remove_partial_files(results_dir)
        raise TaskInterrupted(f"interrupted; {rerun_note(config, results_dir)}") from None
    if job.progress.early_end is not None:
        raise early_end_error(job.progress.early_end, config, results_dir)
    last_epoch = status_lines(results_dir)[-1]  # the final epoch is always validated
    threshold = f"{last_epoch['threshold']:.4f}" if "threshold" in last_epoch \
        else "none (no validation set; model.margin decides)"
    log.info("done: %s -> %s (epoch %d), calibrated threshold %s; per-epoch metrics in %s",
             storage.join(results_dir, LATEST_NAME), epoch_checkpoint_name(last_epoch["epoch"]),
             last_epoch["epoch"], threshold, storage.join(results_dir, STATUS_FILE))


def _fit(config: ExperimentConfig, pipeline: PipelineSpec, train_table: PairTable,
         validation_table: PairTable | None, results_dir: str, resume_from: str | None,
         done_epochs: int) -> TrainJob:
    """Decode the splits once, then run the Ray Train job (inside a Ray session)."""
    train = config.train
    use_gpu = uses_gpus(config.ray)
    workers = config.ray.num_workers or (train.num_gpus if use_gpu else 1)
    check_batches(len(train_table), train_table.source, config.dataset.batch_size, workers)
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
        storage_path=storage.absolute(config.ray.storage_path),
        failure_config=FailureConfig(max_failures=config.ray.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=1)))
    job.progress.render_while(trainer.fit)
    return job


def shared_training_paths(config: ExperimentConfig, results_dir: str,
                          train_table: PairTable) -> list[SharedPath]:
    """What every node that may host a training worker must see: where rank 0 writes, Ray
    Train's storage, and the images (the first of the training split stands for them)."""
    return [SharedPath("train.results_dir", results_dir, is_folder=True),
            SharedPath("ray.storage_path", config.ray.storage_path, is_folder=True),
            shared_images(train_table)]


def _check_tensorboard(config: ExperimentConfig, results_dir: str) -> None:
    if config.train.tensorboard.enabled and storage.is_uri(results_dir):
        raise ConfigError(f"train.tensorboard.enabled needs a local train.results_dir (TensorBoard writes "
                          f"its event files into a folder), not {results_dir}: set it to false, or "
                          "train into a local folder")


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


def _validation_note(table: PairTable | None) -> str:
    return f", {len(table)} validation pairs" if table is not None else ", no validation set"
