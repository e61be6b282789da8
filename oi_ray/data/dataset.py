"""Ray Data pipelines that turn a validated PairTable into model-ready batches.

Decoding and resizing are deterministic, so they run once (``map_batches`` over all CPUs)
into a materialized cache of compact uint8 lighting stacks. Everything random comes after
the cache and is redone per epoch: TAO's ``fpratio_sampling`` resample with replacement,
a shuffle, optional paired augmentation, then tiling. Evaluation and inference read every
pair exactly once, in CSV order.

Batches carry ``row`` (CSV row index), ``target`` (1 defect, 0 PASS, -1 unlabeled) and
``test`` / ``golden``: tiled uint8 ``(B, H', W', 3)`` pictures, which
:class:`oi_ray.model.inputs.InputNormalizer` turns into model inputs on the model's device.
"""

from dataclasses import dataclass

import numpy as np
import ray.data
from ray.data import Dataset

from oi_ray.config.schema import AugmentationConfig, DatasetConfig
from oi_ray.data import augment
from oi_ray.data.assemble import RESIZE_AUGMENT, RESIZE_PLAIN, InputGeometry, assemble, read_stack
from oi_ray.data.pairs import PairTable
from oi_ray.errors import DataError

DECODE_BATCH_ROWS = 32
ROWS_PER_BLOCK = 128


@dataclass(frozen=True)
class PipelineSpec:
    """The narrow piece of the spec the pipelines need."""

    geometry: InputGeometry
    augmentation: AugmentationConfig | None  # None: no training augmentation
    fpratio_sampling: float

    @classmethod
    def from_config(cls, dataset: DatasetConfig) -> "PipelineSpec":
        aug = dataset.augmentation_config
        return cls(InputGeometry.from_config(dataset), aug if aug.augment else None,
                   dataset.fpratio_sampling)


def decode_cache(table: PairTable, spec: PipelineSpec, *, for_training: bool) -> Dataset:
    """Decode every pair once into a materialized dataset of uint8 lighting stacks."""
    augmenting = for_training and spec.augmentation is not None
    resample = RESIZE_AUGMENT if augmenting else RESIZE_PLAIN
    return (
        _source(table)
        .map_batches(_decode_batch, fn_kwargs={"geometry": spec.geometry, "resample": resample},
                     batch_size=DECODE_BATCH_ROWS, batch_format="numpy")
        .materialize()
    )


def training_epoch(cache: Dataset, targets: np.ndarray, spec: PipelineSpec, *,
                   epoch: int, seed: int) -> Dataset:
    """One epoch of training pairs: fpratio resample, shuffle, augment, tile.

    The draw depends only on ``(seed, epoch)`` (``seed < 0``: fresh entropy), so a resumed
    run sees the same epochs as an uninterrupted one.
    """
    rng = np.random.default_rng(None if seed < 0 else [seed, epoch])
    counts = resample_counts(targets, spec.fpratio_sampling, rng)
    shuffle_seed = int(rng.integers(2**31))
    epoch_pairs = (
        cache.map_batches(_repeat_rows, fn_kwargs={"counts": counts}, batch_format="numpy")
        .random_shuffle(seed=shuffle_seed)
        .map_batches(_finish_batch, batch_format="numpy", fn_kwargs={
            "geometry": spec.geometry, "augmentation": spec.augmentation,
            "seed": int(rng.integers(2**31)),
        })
    )
    # Blocks in shuffle order, not in whichever order tasks finish: a seeded run repeats exactly.
    epoch_pairs.context.execution_options.preserve_order = True
    return epoch_pairs


def evaluation_dataset(table: PairTable | Dataset, spec: PipelineSpec) -> Dataset:
    """Every pair once, in CSV order, tiled without augmentation.

    ``table`` is a PairTable, or a cache from :func:`decode_cache` to score repeatedly.
    """
    cache = table if isinstance(table, Dataset) else _source(table).map_batches(
        _decode_batch, fn_kwargs={"geometry": spec.geometry, "resample": RESIZE_PLAIN},
        batch_size=DECODE_BATCH_ROWS, batch_format="numpy")
    dataset = cache.map_batches(_finish_batch, batch_format="numpy", fn_kwargs={
        "geometry": spec.geometry, "augmentation": None, "seed": 0})
    dataset.context.execution_options.preserve_order = True
    return dataset


def resample_counts(targets: np.ndarray, fpratio: float, rng: np.random.Generator) -> np.ndarray:
    """How often each row appears in one training epoch (TAO's weighted sampler).

    Sampling with replacement, epoch length = number of rows; PASS rows weigh 1, defect rows
    ``num_pass / num_defect * fpratio``, so about ``fpratio`` defects are drawn per PASS pair.
    """
    defects = int(np.count_nonzero(targets == 1))
    passes = int(np.count_nonzero(targets == 0))
    if defects == 0 or passes == 0:
        raise DataError(
            f"training needs PASS and defect pairs for fpratio_sampling; found {passes} PASS "
            f"and {defects} defect rows"
        )
    weights = np.where(targets == 1, passes / defects * fpratio, 1.0)
    return rng.multinomial(len(targets), weights / weights.sum()).astype(np.int32)


def _source(table: PairTable) -> Dataset:
    frame = table.pipeline_frame()
    return ray.data.from_pandas([frame.iloc[start:start + ROWS_PER_BLOCK]
                                 for start in range(0, len(frame), ROWS_PER_BLOCK)])


def _decode_batch(batch: dict[str, np.ndarray], geometry: InputGeometry, resample) -> dict[str, np.ndarray]:
    return {
        "row": batch["row"],
        "target": batch["target"],
        "test": np.stack([read_stack(list(paths), geometry, resample) for paths in batch["test_paths"]]),
        "golden": np.stack([read_stack(list(paths), geometry, resample)
                            for paths in batch["golden_paths"]]),
    }


def _repeat_rows(batch: dict[str, np.ndarray], counts: np.ndarray) -> dict[str, np.ndarray]:
    picks = np.repeat(np.arange(len(batch["row"])), counts[batch["row"]])
    return {name: column[picks] for name, column in batch.items()}


def _finish_batch(batch: dict[str, np.ndarray], geometry: InputGeometry,
                  augmentation: AugmentationConfig | None, seed: int) -> dict[str, np.ndarray]:
    test, golden = batch["test"], batch["golden"]
    if augmentation is not None and len(test):
        rng = np.random.default_rng([seed, *batch["row"][:4].tolist()])
        pairs = [augment.augment_pair(t, g, augment.draw(augmentation, geometry.height, geometry.width, rng))
                 for t, g in zip(test, golden, strict=True)]
        test = np.stack([t for t, _ in pairs])
        golden = np.stack([g for _, g in pairs])
    return {
        "row": batch["row"],
        "target": batch["target"],
        "test": assemble(test, geometry),
        "golden": assemble(golden, geometry),
    }
