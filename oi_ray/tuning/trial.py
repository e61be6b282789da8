"""One sweep trial: the spec with the trial's parameters, trained by the same TorchTrainer as
``oi-ray train``.

Ray Tune runs :func:`run_trial` as a function trainable; inside, Ray Train fits the trainer
with Ray's ``TuneReportCallback``, so every epoch's metrics (rank 0's report) reach Tune, and
its scheduler can stop the trial between epochs. The trial's results folder holds TAO-named
checkpoints, ``status.json`` and its resolved spec, like a ``train.results_dir``; its Ray Train
run is named after the trial, and a restarted trial resumes from its own
``oi_model_latest.pth``. The decoded images come from the sweep, decoded once for all trials,
or (``tune.share_decoded_images: false``) each trial decodes its own splits.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.tune
from ray.train import CheckpointConfig, RunConfig
from ray.tune.integration.ray_train import TuneReportCallback

from oi_ray.config import config_from_mapping
from oi_ray.config.schema import ExperimentConfig
from oi_ray.data.dataset import DecodedCache, PipelineSpec, decode_cache
from oi_ray.training.driver import (
    check_batches,
    early_end_error,
    load_tables,
    make_trainer,
    prepare_job,
    resume_point,
)


@dataclass(frozen=True)
class SweepPlan:
    """What every trial of a sweep shares."""

    base: dict[str, Any]  # the resolved spec the trials' parameters are set on
    trials_dir: str  # one results folder per trial below it
    train_storage: str  # Ray Train's storage for the trials' runs
    train_cache: DecodedCache | None  # None: each trial decodes its own splits
    validation_cache: DecodedCache | None
    workers: int  # training workers per trial
    use_gpu: bool
    threads: int  # torch threads per worker


def run_trial(params: dict[str, Any], plan: SweepPlan) -> None:
    """Ray Tune function trainable: train the base spec with ``params`` (dotted key -> value)."""
    name = ray.tune.get_context().get_trial_name()
    results_dir = str(Path(plan.trials_dir) / name)
    config = config_from_mapping(plan.base, f"trial {name}", {**params, "train.results_dir": results_dir})
    resume_from, done_epochs = resume_point(config, results_dir)
    if done_epochs >= config.train.num_epochs:
        return  # finished before the sweep was interrupted
    pipeline = PipelineSpec.from_config(config.dataset)
    train_cache, validation_cache = _caches(plan, config, pipeline)
    check_batches(len(train_cache), f"trial {name}", config.dataset.batch_size, plan.workers)
    job = prepare_job(config, pipeline, train_cache, validation_cache, results_dir, resume_from, plan.threads)
    trainer = make_trainer(job, plan.workers, plan.use_gpu, RunConfig(
        name=name, storage_path=plan.train_storage, callbacks=[TuneReportCallback()],
        checkpoint_config=CheckpointConfig(num_to_keep=1)))
    job.progress.render_while(trainer.fit, quiet=True)
    if job.progress.early_end is not None:
        raise early_end_error(job.progress.early_end, config, results_dir)


def _caches(plan: SweepPlan, config: ExperimentConfig,
            pipeline: PipelineSpec) -> tuple[DecodedCache, DecodedCache | None]:
    """The decoded training and validation splits: the sweep's, or decoded for this trial."""
    if plan.train_cache is not None:
        return plan.train_cache, plan.validation_cache
    train_table, validation_table = load_tables(config)
    train_cache = decode_cache(train_table, pipeline, for_training=True)
    if validation_table is None:
        return train_cache, None
    return train_cache, decode_cache(validation_table, pipeline, for_training=False)
