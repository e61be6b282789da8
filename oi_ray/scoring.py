"""Scoring a dataset split: Ray Data batch inference with a predictor, results in CSV order."""

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import ray.data
import torch
from ray.util.annotations import RayDeprecationWarning

from oi_ray.data.dataset import PipelineSpec, evaluation_dataset
from oi_ray.data.pairs import PairTable
from oi_ray.predictors import Predictor


@dataclass(frozen=True)
class Scores:
    """One distance per pair, in CSV row order."""

    rows: np.ndarray  # CSV row indices 0..n-1
    targets: np.ndarray  # 1 defect, 0 PASS, -1 unlabeled
    distances: np.ndarray  # float32
    pixel_differences: np.ndarray | None = None  # mean |test - golden| per pair, a naive baseline


def score_batches(predictor: Predictor, batches: Iterable[dict[str, np.ndarray]]) -> Scores:
    """Score pipeline batches in this process (validation inside a training worker)."""
    rows, targets, distances = [], [], []
    for batch in batches:
        rows.append(batch["row"])
        targets.append(batch["target"])
        distances.append(predictor.distances(batch["test"], batch["golden"]))
    return _in_row_order(np.concatenate(rows), np.concatenate(targets), np.concatenate(distances), None)


def score_table(table: PairTable, spec: PipelineSpec, load_predictor: Callable[[], Predictor], *,
                batch_size: int, use_gpu: bool, actors: int, threads: int) -> Scores:
    """Score every pair of ``table`` with Ray Data: ``actors`` predictor replicas, one per GPU
    when ``use_gpu``. ``load_predictor`` runs once in each replica."""
    with warnings.catch_warnings():
        # max_restarts has no named parameter in Ray 2.60; without it Ray logs a restart caveat
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", RayDeprecationWarning)
        scored = evaluation_dataset(table, spec).map_batches(
            _ScoreBatch, fn_constructor_kwargs={"load_predictor": load_predictor, "threads": threads},
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            # Ray Data reserves 1 CPU per replica either way (naming num_cpus beside num_gpus logs
            # an "experimental" warning on every GPU run)
            num_gpus=1 if use_gpu else 0,
            max_restarts=0,  # a replica that dies fails the run instead of being restarted silently
        )
    columns = scored.to_pandas()
    scores = _in_row_order(columns["row"].to_numpy(), columns["target"].to_numpy(),
                           columns["distance"].to_numpy(), columns["pixel_difference"].to_numpy())
    if len(scores.rows) != len(table) or not np.array_equal(scores.rows, np.arange(len(table))):
        raise RuntimeError(f"scored {len(scores.rows)} pairs of {len(table)}: rows lost or repeated")
    return scores


class _ScoreBatch:
    """Ray Data actor: loads the predictor once, then scores batches."""

    def __init__(self, load_predictor: Callable[[], Predictor], threads: int) -> None:
        torch.set_num_threads(threads)
        self.predictor = load_predictor()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        test, golden = batch["test"], batch["golden"]
        return {"row": batch["row"], "target": batch["target"],
                "distance": self.predictor.distances(test, golden),
                "pixel_difference": np.abs(test.astype(np.int16) - golden).mean(axis=(1, 2, 3))}


def _in_row_order(rows: np.ndarray, targets: np.ndarray, distances: np.ndarray,
                  pixel_differences: np.ndarray | None) -> Scores:
    order = np.argsort(rows, kind="stable")
    return Scores(rows[order], targets[order].astype(np.int8), distances[order].astype(np.float32),
                  None if pixel_differences is None else pixel_differences[order].astype(np.float32))
