"""``oi-ray check_dataset``: validate every dataset split of a spec and preview the pipeline.

Runs the same checks training and scoring run first (columns, labels, duplicates, every
lighting image of both sides), prints per-split counts, then pushes the training split
through the training pipeline (Ray Data decode cache, then one fpratio-resampled epoch in
whole batches, augmented when the spec says so) and the other splits through the evaluation
pipeline, reporting shapes, dtypes and the drawn defect share.
"""

import logging
import time
from collections.abc import Iterable

import numpy as np

from oi_ray.config.schema import DATASET_SPLITS, ExperimentConfig
from oi_ray.data.dataset import PipelineSpec, decode_cache, evaluation_dataset
from oi_ray.data.epochs import CacheReader, epoch_plan, training_batches
from oi_ray.data.pairs import ImageNaming, PairTable, load_split
from oi_ray.errors import ConfigError
from oi_ray.model.inputs import InputNormalizer
from oi_ray.runtime import ray_session

log = logging.getLogger(__name__)


def run(config: ExperimentConfig) -> None:
    """Validate all configured splits, then run them through Ray Data and report."""
    dataset = config.dataset
    naming = ImageNaming.from_config(dataset)
    tables: dict[str, PairTable] = {
        split: load_split(dataset, split, require_labels=split != "infer_dataset")
        for split in DATASET_SPLITS if getattr(dataset, split).is_set
    }
    if not tables:
        raise ConfigError("no dataset split is set: give dataset.<split>.csv_path (or .shards) for one of "
                          f"{DATASET_SPLITS}")

    spec = PipelineSpec.from_config(dataset)
    shape = "x".join(map(str, spec.geometry.input_shape))
    lights = ", ".join(naming.lights) or "one image per side"
    log.info("model input per side: %s float32 (%s, %s)", shape, lights, dataset.concat_type)
    normalize = InputNormalizer(spec.geometry)
    with ray_session(config.ray):
        for split, table in tables.items():
            start = time.perf_counter()
            if split == "train_dataset":
                cache = decode_cache(table, spec, for_training=True)
                seed = max(config.train.seed, 0)  # -1 (unseeded) previews with seed 0
                plan = epoch_plan(cache.targets, spec.fpratio_sampling, seed=seed, epoch=0, world=1,
                                  batch_size=dataset.batch_size)[0]
                batches = training_batches(cache, CacheReader(cache), plan, spec,
                                           batch_size=dataset.batch_size, seed=(seed, 0, 0))
            else:
                batches = evaluation_dataset(table, spec).iter_batches(batch_size=dataset.batch_size,
                                                                       batch_format="numpy")
            rows, targets, first = _drain(batches)
            seconds = time.perf_counter() - start
            model_input = normalize(first["test"])
            what = "decoded by Ray Data, one epoch's" if split == "train_dataset" else "through Ray Data,"
            summary = (f"{split}: {what} {rows} pairs in {seconds:.1f} s, batches of "
                       f"{first['test'].shape} {first['test'].dtype} -> model input "
                       f"{tuple(model_input.shape)} {str(model_input.dtype).removeprefix('torch.')}")
            if split == "train_dataset":
                summary += (f"; epoch 1 drew {np.mean(targets == 1):.1%} defects "
                            f"(fpratio_sampling {dataset.fpratio_sampling} -> "
                            f"{dataset.fpratio_sampling / (1 + dataset.fpratio_sampling):.1%} expected)")
            log.info(summary)
    log.info("dataset OK")


def _drain(batches: Iterable[dict[str, np.ndarray]]) -> tuple[int, np.ndarray, dict[str, np.ndarray]]:
    rows, targets, first = 0, [], None
    for batch in batches:
        if first is None:
            first = batch
        rows += len(batch["row"])
        targets.append(batch["target"])
    return rows, np.concatenate(targets), first
