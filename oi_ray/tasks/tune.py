"""``oi-ray tune``: a Ray Tune sweep over spec keys, each trial an ``oi-ray train`` run.

Before Ray starts: the search space is checked entry by entry, and the splits and images as
``train`` checks them. Then the images are decoded once for the whole sweep (unless
``tune.share_decoded_images`` is false: then each trial decodes its own), and Ray Tune runs
the trials (:mod:`oi_ray.tuning.trial`) with the spec's scheduler (ASHA over validation
epochs) and search algorithm. A trial that fails or diverges is recorded as failed and the
sweep goes on; the sweep fails only when every trial failed. The console shows one line per
finished trial and a final table; the sweep's folder gets ``results.csv``, a plot and
``best/`` (:mod:`oi_ray.tuning.results`). ``--resume`` continues an interrupted sweep.
"""

import dataclasses
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import ray
from omegaconf import OmegaConf
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from oi_ray import storage
from oi_ray.config.schema import (
    ExperimentConfig,
    RayConfig,
    SchedulerType,
    SearchAlg,
    SearchType,
    TuneTrialResources,
)
from oi_ray.console import command
from oi_ray.data.dataset import PipelineSpec, decode_cache
from oi_ray.errors import BackendUnavailableError, ConfigError, OiRayError, TaskInterrupted
from oi_ray.launch.shared_paths import SharedPath, check_shared, worker_nodes
from oi_ray.runtime import ray_session, torch_threads, uses_gpus
from oi_ray.training.driver import load_tables, shared_images
from oi_ray.tuning.results import choose_best, summarize, write_best, write_results
from oi_ray.tuning.search import grid_points, param_space, search_problems
from oi_ray.tuning.trial import SweepPlan, run_trial

log = logging.getLogger(__name__)
TRIALS_DIR = "trials"
RAY_DIR = "ray"  # Ray Tune's experiment state and the trials' Ray Train runs
TRIAL_DRIVER_CPUS = 0.01  # the trial function only waits on its Ray Train run, whose workers hold CPUs


class SweepFailedError(OiRayError):
    """Every trial of a sweep failed."""


def run(config: ExperimentConfig, resume: bool = False) -> None:
    """Run (or with ``resume`` continue) the sweep of ``config.tune``."""
    settings = config.tune
    trial_ray = _trial_ray(config.ray, settings.resources_per_trial)
    # the spec every trial starts from, holding the resources it trains with
    base = OmegaConf.to_container(OmegaConf.structured(dataclasses.replace(config, ray=trial_ray)),
                                  resolve=True)
    _check_search(config, base)
    sweep_dir = Path(settings.results_dir).resolve() / settings.name
    experiment = sweep_dir / RAY_DIR / settings.name
    _check_resume(config, experiment, resume)
    train_table, validation_table = load_tables(config)
    pipeline = PipelineSpec.from_config(config.dataset)
    with ray_session(_with_state_api(config.ray)):
        use_gpu = uses_gpus(trial_ray)
        workers = trial_ray.num_workers
        concurrent = _concurrency(settings.max_concurrent_trials, trial_ray, use_gpu)
        # every trial's workers write below the sweep's folder, wherever Ray places them
        check_shared([SharedPath("tune.results_dir", str(sweep_dir), is_folder=True),
                      shared_images(train_table)],
                     worker_nodes(trial_ray.cpus_per_worker, trial_ray.gpus_per_worker if use_gpu else 0))
        log.info("sweep %s: %s over %s; %d trial(s) at a time, %d %s worker(s) each; results in %s",
                 settings.name, _trial_count(config), ", ".join(settings.search_space), concurrent, workers,
                 "GPU" if use_gpu else "CPU", sweep_dir)
        shared = settings.share_decoded_images
        plan = SweepPlan(
            base=base, trials_dir=str(sweep_dir / TRIALS_DIR),
            train_storage=str(sweep_dir / RAY_DIR / "train"),
            train_cache=decode_cache(train_table, pipeline, for_training=True) if shared else None,
            validation_cache=(decode_cache(validation_table, pipeline, for_training=False)
                              if shared and validation_table is not None else None),
            workers=workers, use_gpu=use_gpu,
            threads=torch_threads(trial_ray, workers * concurrent))
        trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan),
                                        {"CPU": TRIAL_DRIVER_CPUS})
        tuner = (tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=False)
                 if resume else _new_tuner(config, trainable, sweep_dir, concurrent))
        # Ray Tune's newer console output prints its own header and tables even at verbose=0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        results, interrupted = _fit_noting_interrupt(tuner)
    if interrupted:  # Ray Tune ended the run on Ctrl-C and saved its state
        raise TaskInterrupted(f"sweep interrupted; rerun the same command with --resume to continue it "
                              f"(tune.name={settings.name}): finished trials are kept")
    _report(config, base, results, sweep_dir)


def _fit_noting_interrupt(tuner: tune.Tuner) -> tuple[Any, bool]:
    """Run the sweep; say whether Ctrl-C ended it. Ray Tune ends a run gracefully on Ctrl-C and
    then puts back the SIGINT handler it found, which it otherwise leaves replaced by its own."""
    if threading.current_thread() is not threading.main_thread():  # Tune catches no signal there
        return tuner.fit(), False
    found = signal.getsignal(signal.SIGINT)
    results = tuner.fit()
    interrupted = signal.getsignal(signal.SIGINT) is found
    signal.signal(signal.SIGINT, found)
    return results, interrupted


def _check_search(config: ExperimentConfig, base: dict[str, Any]) -> None:
    settings = config.tune
    if not settings.search_space:
        raise ConfigError("tune.search_space is empty: give the spec keys to sweep, e.g. "
                          "tune.search_space={model.margin: {type: uniform, low: 0.5, high: 3.0}}")
    problems = search_problems(settings.search_space, base, settings.share_decoded_images)
    for key, entry in settings.search_space.items():
        if settings.search_alg == SearchAlg.GRID and entry.type != SearchType.GRID:
            problems.append(f"tune.search_space.{key}: grid search takes grid entries only, not {entry.type}")
        if settings.search_alg == SearchAlg.OPTUNA and entry.type == SearchType.GRID:
            problems.append(f"tune.search_space.{key}: optuna draws every value itself and takes no grid "
                            f"entries; use type choice")
    if storage.is_uri(settings.results_dir):
        problems.append(f"tune.results_dir={settings.results_dir}: a sweep writes into a local folder (on a "
                        f"cluster, one that every node mounts); its trials' data may sit in a bucket")
    if settings.metric.startswith("val_") and not config.dataset.validation_dataset.is_set:
        problems.append(f"tune.metric={settings.metric} needs dataset.validation_dataset")
    if problems:
        raise ConfigError("invalid sweep:\n" + "\n".join(f"  - {problem}" for problem in problems))
    if settings.search_alg == SearchAlg.OPTUNA:
        try:
            import optuna  # noqa: F401  (imported for the check; Ray's OptunaSearch imports it again)
        except ImportError:
            raise BackendUnavailableError("tune.search_alg=optuna needs optuna: "
                                          "pip install -e '.[tune]'") from None


def _check_resume(config: ExperimentConfig, experiment: Path, resume: bool) -> None:
    exists = tune.Tuner.can_restore(str(experiment))
    if resume and not exists:
        raise ConfigError(f"--resume: no sweep to continue at {experiment} (tune.name={config.tune.name})")
    if exists and not resume:
        raise ConfigError(f"a sweep named {config.tune.name!r} already exists in {experiment.parent.parent}; "
                          f"continue it with --resume, or start another with tune.name=<new name>")


def _with_state_api(ray_config: RayConfig) -> RayConfig:
    """An embedded Ray for a sweep runs the dashboard (on 127.0.0.1): Ray Train frees the workers
    of a trial the scheduler stopped through the state API, which the dashboard serves;
    without it they keep their CPUs/GPUs and the sweep stalls."""
    if ray_config.address is None and not ray_config.include_dashboard and not ray.is_initialized():
        log.info("starting Ray's dashboard on 127.0.0.1: Ray Train needs its state API to free "
                 "the workers of stopped trials")
        return dataclasses.replace(ray_config, include_dashboard=True)
    return ray_config


def _trial_ray(ray_config: RayConfig, resources: TuneTrialResources) -> RayConfig:
    """The ``ray`` section one trial trains with: ``tune.resources_per_trial`` where set."""
    return dataclasses.replace(
        ray_config, num_workers=resources.num_workers or ray_config.num_workers or 1,
        cpus_per_worker=resources.cpus_per_worker or ray_config.cpus_per_worker,
        gpus_per_worker=(resources.gpus_per_worker if resources.gpus_per_worker is not None
                         else ray_config.gpus_per_worker))


def _concurrency(max_concurrent_trials: int | None, trial_ray: RayConfig, use_gpu: bool) -> int:
    """How many trials run at once: ``tune.max_concurrent_trials``, else as many as the
    cluster's CPUs (and GPUs) hold."""
    if max_concurrent_trials:
        return max_concurrent_trials
    workers, cpus, gpus = trial_ray.num_workers, trial_ray.cpus_per_worker, trial_ray.gpus_per_worker
    available = ray.cluster_resources()
    fits = int(available.get("CPU", 0) // (workers * cpus + TRIAL_DRIVER_CPUS))
    if use_gpu and gpus > 0:
        fits = min(fits, int(available.get("GPU", 0) // (workers * gpus)))
    if fits < 1:
        raise ConfigError(f"one trial needs {workers} worker(s) x {cpus:g} CPU(s); the Ray cluster has "
                          f"{available.get('CPU', 0):g}")
    return fits


def _new_tuner(config: ExperimentConfig, trainable: Any, sweep_dir: Path, concurrent: int) -> tune.Tuner:
    settings = config.tune
    scheduler = None
    if settings.scheduler.type == SchedulerType.ASHA:
        scheduler = ASHAScheduler(time_attr="epoch", max_t=config.train.num_epochs,
                                  grace_period=settings.scheduler.grace_period,
                                  reduction_factor=settings.scheduler.reduction_factor)
    search_alg = None
    if settings.search_alg == SearchAlg.OPTUNA:
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search_alg = ConcurrencyLimiter(OptunaSearch(), max_concurrent=concurrent)
    return tune.Tuner(
        trainable,
        param_space=param_space(settings.search_space),
        tune_config=tune.TuneConfig(
            metric=settings.metric, mode=settings.mode, num_samples=settings.num_samples, scheduler=scheduler,
            search_alg=search_alg, max_concurrent_trials=concurrent,
            # A stopped trial's process must end: a reused one would keep its Ray Train run going.
            reuse_actors=False,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=settings.name, storage_path=str(sweep_dir / RAY_DIR), verbose=0,
                                  callbacks=[_TrialLines(settings.metric, config.train.num_epochs)]),
    )


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


class _TrialLines(tune.Callback):
    """One console line per finished trial."""

    def __init__(self, metric: str, num_epochs: int) -> None:
        self.metric = metric
        self.num_epochs = num_epochs

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        epochs = int(result.get("epoch", 0))
        how = "completed" if epochs >= self.num_epochs \
            else f"stopped early by the scheduler after epoch {epochs}"
        value = result.get(self.metric)
        shown = f"{self.metric} {value:.4f}" if isinstance(value, float) else f"no {self.metric}"
        log.info("%s %s: %s, %s", trial, _params_text(trial.config), how, shown)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.warning("%s %s: failed (recorded; the sweep goes on)", trial, _params_text(trial.config))


def _params_text(params: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                           for key, value in params.items()) + ")"


def _report(config: ExperimentConfig, base: dict[str, Any], results: Any, sweep_dir: Path) -> None:
    settings = config.tune
    summaries = summarize(results, settings.metric, settings.mode, config.train.num_epochs)
    best = choose_best(summaries, settings.mode)
    written = write_results(summaries, settings.metric, sweep_dir, best)
    lines = [f"{'trial':<20}{'status':<15}{'epochs':>7}{f'last {settings.metric}':>16}  parameters"]
    for summary in summaries:
        last = f"{summary.last:.4f}" if summary.last is not None else "-"
        marker = " *" if best is not None and summary.name == best.name else ""
        lines.append(f"{summary.name:<20}{summary.status:<15}{summary.epochs:>7}{last:>16}  "
                     f"{_params_text(summary.params)}{marker}")
        if summary.error:
            lines.append(f"{'':<20}error: {summary.error}")
    print("\n".join(lines))
    if best is None:
        failed = [summary for summary in summaries if summary.status == "failed"]
        reason = failed[0].error if failed else f"no trial reported {settings.metric}"
        raise SweepFailedError(f"every trial failed; the first: {reason}; results in {written[0]}")
    spec = write_best(best, base, sweep_dir / TRIALS_DIR, sweep_dir)
    log.info("best: %s (last %s %.4f); wrote %s, %s and %s", best.name, settings.metric, best.last,
             written[0], Path(written[1]).name, spec.parent)
    log.info("export it: %s", command("export", "-e", spec))


def _trial_count(config: ExperimentConfig) -> str:
    settings = config.tune
    points = grid_points(settings.search_space)
    total = settings.num_samples * points
    return f"{total} trial(s)" + (f" ({points} grid points x {settings.num_samples})" if points > 1 else "")

