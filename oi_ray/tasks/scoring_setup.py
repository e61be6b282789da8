"""What ``evaluate`` and ``inference`` share: which split to read, which model and threshold
to use, and scoring the split with Ray Data. Everything is checked before Ray starts."""

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from oi_ray.config.schema import ExperimentConfig
from oi_ray.data.dataset import PipelineSpec
from oi_ray.data.pairs import PairTable, first_configured_split, load_split
from oi_ray.decision import choose_threshold
from oi_ray.errors import BackendUnavailableError, ConfigError
from oi_ray.model_card import ModelCard
from oi_ray.model_file import open_model_file
from oi_ray.predictors import ONNX_SUFFIXES, is_tensorrt_file, onnxruntime_has_cuda
from oi_ray.runtime import ray_session, torch_threads, uses_gpus
from oi_ray.scoring import Scores, score_table
from oi_ray.storage import is_uri

log = logging.getLogger(__name__)
SLOW_SINGLE_PAIR_ROWS = 1000  # above this, batch 1 scoring is worth a hint


@dataclass(frozen=True)
class ScoringRun:
    """A split scored with a checkpoint, and the decision threshold to apply."""

    model_file: str  # the .pth, .onnx or .engine that scored: the spec's URI, or the file's absolute path
    split: str
    table: PairTable
    scores: Scores
    threshold: float
    threshold_source: str


def score_split(config: ExperimentConfig, task: str, splits: Sequence[str], *, require_labels: bool,
                columns: Mapping[str, str] | None = None) -> ScoringRun:
    """Score the first configured split of ``splits`` with ``<task>.checkpoint``; ``columns`` maps
    spec keys to the CSV columns they name, which the split must have."""
    section = getattr(config, task)
    model_file = section.trt_engine or section.checkpoint
    if not model_file:
        raise ConfigError(f"{task}.checkpoint is not set: give the .pth, .onnx or .engine to use, "
                          f"e.g. {task}.checkpoint=results/train/oi_model_latest.pth")
    split = _choose_split(config, task, splits)
    table = load_split(config.dataset, split, require_labels=require_labels)
    for key, column in (columns or {}).items():
        table.require_column(column, key)
    model = open_model_file(model_file, config.encryption_key, ModelCard.expected_by(config))
    model.check_halves()
    checkpoint = model.path
    threshold = choose_threshold(section.threshold, f"{task}.threshold", model.carried, config.model.margin)
    batch_size = section.batch_size if section.batch_size > 0 else config.dataset.batch_size
    if batch_size == 1 and len(table) > SLOW_SINGLE_PAIR_ROWS:
        log.info("%s.batch_size=1 (TAO's default) scores one pair per call; %s.batch_size=%d gives the "
                 "same scores much faster", task, task, config.dataset.batch_size)

    with ray_session(config.ray):
        use_gpu = uses_gpus(config.ray)
        if is_tensorrt_file(checkpoint) and not use_gpu:
            raise BackendUnavailableError(f"{checkpoint} is a TensorRT engine, which needs GPU replicas, "
                                          f"and the Ray cluster has no GPU; score the .onnx model instead")
        actors = section.num_gpus if use_gpu else 1
        log.info("scoring %d pairs of %s with %s on %d %s replica(s), batch %d%s", len(table),
                 table.source, checkpoint, actors, "GPU" if use_gpu else "CPU", batch_size,
                 f"; {table.distinct_goldens()} distinct goldens, each embedded once"
                 if model.scores_in_halves else "")
        if use_gpu and checkpoint.suffix in ONNX_SUFFIXES and not onnxruntime_has_cuda():
            log.warning("onnxruntime here has no CUDA provider: the GPU replicas run %s on their CPUs; "
                        "install the gpu extra (pip install -e '.[gpu]') to run it on them", checkpoint.name)
        load = functools.partial(model.load_scorer, use_gpu)
        scores = score_table(table, PipelineSpec.from_config(config.dataset), load,
                             batch_size=batch_size, use_gpu=use_gpu, actors=actors,
                             threads=torch_threads(config.ray, actors))
    location = model_file if is_uri(model_file) else str(checkpoint.resolve())
    return ScoringRun(location, split, table, scores, threshold.value, threshold.source)


def _choose_split(config: ExperimentConfig, task: str, splits: Sequence[str]) -> str:
    split = first_configured_split(config.dataset, splits)
    if split is None:
        wanted = " or ".join(f"dataset.{name}.csv_path (or .shards)" for name in splits)
        raise ConfigError(f"{task} needs a dataset: set {wanted}")
    if split != splits[0]:
        log.info("dataset.%s is not set: %s uses dataset.%s", splits[0], task, split)
    return split

