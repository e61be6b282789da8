"""A finished sweep, written down: one row per trial, a plot, and the best trial ready to use.

``results.csv`` has one row per trial: its parameters, the best and last value of the sweep's
metric, the epochs it ran, whether the scheduler stopped it early, its status (``completed``,
``early_stopped`` or ``failed`` with the error) and its wall time. ``<metric>.png`` draws the
metric of every trial over epochs. ``best/`` holds the best trial's final checkpoint (TAO
names: ``model_epoch_NNN.pth`` and ``oi_model_latest.pth``) and a resolved spec whose train,
evaluate, inference and export sections point at it, so ``oi-ray export -e best/spec.yaml``
works as it is. The best trial is the one whose *last* metric is best: ``best/`` delivers the
checkpoint of that epoch. (A trial that the scheduler stopped can have finished one more epoch
before its training ended; that epoch's files stay in the trial's folder, unjudged.)
"""

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from oi_ray.checkpoint import LATEST_NAME, epoch_checkpoint_path, point_latest_to
from oi_ray.config import config_from_mapping, save_resolved_spec
from oi_ray.config.schema import TuneMode
from oi_ray.errors import find_user_error
from oi_ray.fileio import write_atomically
from oi_ray.plots import write_sweep_plot
from oi_ray.ray_internals import exception_line
from oi_ray.training.status import copy_status

BEST_DIR = "best"


@dataclass(frozen=True)
class TrialSummary:
    """What one trial did."""

    name: str
    params: dict[str, Any]
    status: str  # completed | early_stopped | failed
    best: float | None  # the best value of the metric over its epochs
    last: float | None  # the metric at its last epoch
    epochs: int
    seconds: float
    error: str | None
    curve: list[tuple[int, float]]  # (epoch, metric)


def summarize(results: Any, metric: str, mode: str, num_epochs: int) -> list[TrialSummary]:
    """A :class:`TrialSummary` per trial of a Ray Tune ``ResultGrid``, in trial order."""
    summaries = []
    for result in results:
        frame = result.metrics_dataframe
        curve = []
        if frame is not None and metric in frame and "epoch" in frame:
            rows = frame[["epoch", metric]].dropna()
            curve = [(int(epoch), float(value)) for epoch, value in rows.itertuples(index=False)]
        values = [value for _, value in curve]
        epochs = int(result.metrics.get("epoch", 0)) if result.metrics else 0
        error = _error_text(result.error) if result.error else None
        status = "failed" if error else "completed" if epochs >= num_epochs else "early_stopped"
        pick = max if mode == TuneMode.MAX else min
        summaries.append(TrialSummary(
            name=Path(result.path).name, params=dict(result.config), status=status,
            best=pick(values) if values else None, last=values[-1] if values else None, epochs=epochs,
            seconds=float(result.metrics.get("time_total_s", 0.0)) if result.metrics else 0.0,
            error=error, curve=curve))
    return sorted(summaries, key=lambda summary: summary.name)


def _error_text(error: BaseException) -> str:
    user_error = find_user_error(error)
    if user_error is not None:
        return str(user_error)
    return exception_line(str(error)) or type(error).__name__


def choose_best(summaries: list[TrialSummary], mode: str) -> TrialSummary | None:
    """The trial whose last metric is best (None when no trial reported the metric)."""
    scored = [summary for summary in summaries if summary.last is not None and math.isfinite(summary.last)]
    if not scored:
        return None
    return (max if mode == TuneMode.MAX else min)(scored, key=lambda summary: summary.last)


def write_results(summaries: list[TrialSummary], metric: str, folder: Path,
                  best: TrialSummary | None) -> list[str]:
    """Write ``results.csv`` and ``<metric>.png`` into ``folder``; return their paths."""
    rows = [{"trial": summary.name, **summary.params, f"best_{metric}": summary.best,
             f"last_{metric}": summary.last,
             "epochs": summary.epochs, "early_stopped": summary.status == "early_stopped",
             "status": summary.status, "seconds": round(summary.seconds, 1), "error": summary.error or ""}
            for summary in summaries]
    table = folder / "results.csv"
    write_atomically(table, pd.DataFrame(rows).to_csv(index=False).encode())
    plot = write_sweep_plot({summary.name: summary.curve for summary in summaries}, metric,
                            folder / f"{metric}.png", best=best.name if best else None)
    return [str(table), plot]


def write_best(best: TrialSummary, base: dict[str, Any], trials_dir: Path, folder: Path) -> Path:
    """``folder/best``: the best trial's final checkpoint and a spec that points at it; return the spec."""
    target = folder / BEST_DIR
    staging = folder / f".{BEST_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    trial_dir = trials_dir / best.name
    checkpoint, epochs = _judged_checkpoint(trial_dir, best.epochs)
    _link_or_copy(checkpoint, staging / checkpoint.name)
    point_latest_to(staging / checkpoint.name)
    copy_status(trial_dir, staging, epochs)
    latest = str(target / LATEST_NAME)
    config = config_from_mapping(base, f"best trial {best.name}", {
        **best.params, "train.results_dir": str(target),
        "evaluate.checkpoint": latest, "evaluate.results_dir": str(target / "evaluate"),
        "inference.checkpoint": latest, "inference.results_dir": str(target / "inference"),
        "export.checkpoint": latest, "export.results_dir": str(target / "export"),
        "export.onnx_file": str(target / "export" / "oi_model.onnx"),
    })
    save_resolved_spec(config, staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target / "spec.yaml"


def _judged_checkpoint(trial_dir: Path, epochs: int) -> tuple[Path, int]:
    """The newest checkpoint of the trial at or before its last judged epoch, and its epoch."""
    for epoch in range(epochs, 0, -1):
        path = epoch_checkpoint_path(trial_dir, epoch)
        if path.exists():
            return path, epoch
    raise FileNotFoundError(f"trial {trial_dir.name} reported {epochs} epoch(s) but has no checkpoint "
                            f"of them in {trial_dir}")


def _link_or_copy(source: Path, destination: Path) -> None:
    """A hard link (no second copy on disk), or a copy across file systems."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
