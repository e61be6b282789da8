"""Ray Data pipelines that turn a validated PairTable into model-ready data.

Decoding and resizing are deterministic, so for training they run once (``map_batches``
over the cluster's CPUs, ``dataset.workers`` tasks at a time) into a :class:`DecodedCache`:
compact uint8 lighting stacks held in Ray's object store, which every training worker reads
zero-copy (see :mod:`oi_ray.data.epochs` for the per-epoch resampling). Evaluation and
inference stream every pair exactly once, in CSV order, through :func:`evaluation_dataset`.

A split packed by ``oi-ray pack`` is read from its Parquet shards by the workers
(:mod:`oi_ray.data.shards`) and decoded the same way, so it gives the same pictures.

Batches carry ``row`` (CSV row index), ``target`` (1 defect, 0 PASS, -1 unlabeled) and
``test`` / ``golden``: tiled uint8 ``(B, H', W', 3)`` pictures, which
:class:`oi_ray.model.inputs.InputNormalizer` turns into model inputs on the model's device.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import ray
import ray.data
from ray.data import Dataset

from oi_ray.config.schema import AugmentationConfig, DatasetConfig
from oi_ray.data.assemble import RESIZE_AUGMENT, RESIZE_PLAIN, InputGeometry, assemble, read_stack
from oi_ray.data.pairs import PairTable
from oi_ray.data.shards import (
    GOLDEN_IMAGES,
    ROW,
    TARGET,
    TEST_IMAGES,
    PackedShards,
    ShardLocation,
    ordered,
    read_row_group,
)
from oi_ray.storage import is_uri

DECODE_BATCH_ROWS = 32
FETCH_THREADS = 16  # requests in flight per decoding task when the images sit in a bucket
ROWS_PER_BLOCK = 128


@dataclass(frozen=True)
class PipelineSpec:
    """The narrow piece of the spec the pipelines need."""

    geometry: InputGeometry
    augmentation: AugmentationConfig | None  # None: no training augmentation
    fpratio_sampling: float
    tasks: int = 8  # Ray Data tasks decoding (and augmenting) at once: dataset.workers

    @classmethod
    def from_config(cls, dataset: DatasetConfig) -> "PipelineSpec":
        aug = dataset.augmentation_config
        return cls(InputGeometry.from_config(dataset), aug if aug.augment else None,
                   dataset.fpratio_sampling, max(1, dataset.workers))


@dataclass(frozen=True)
class DecodedCache:
    """One split decoded once: uint8 lighting stacks in Ray's object store.

    Each block is a dict of numpy arrays ``row``, ``target``, ``test`` and ``golden``
    (``(n, L, H, W, 3)`` uint8). Any process of the cluster reads them zero-copy from its
    node's object store; block order does not matter, rows are found by their ``row``.
    """

    blocks: list[ray.ObjectRef]
    targets: np.ndarray  # per CSV row: 1 defect, 0 PASS, -1 unlabeled

    def __len__(self) -> int:
        return len(self.targets)


def decode_cache(table: PairTable, spec: PipelineSpec, *, for_training: bool) -> DecodedCache:
    """Decode every pair of ``table`` once into a :class:`DecodedCache`."""
    augmenting = for_training and spec.augmentation is not None
    resample = RESIZE_AUGMENT if augmenting else RESIZE_PLAIN
    decoded = _decoded(table, spec, resample, tiled=False)
    return DecodedCache(decoded.to_numpy_refs(), table.targets)


def evaluation_dataset(table: PairTable, spec: PipelineSpec) -> Dataset:
    """Every pair of ``table`` once, in CSV order, tiled without augmentation."""
    dataset = _decoded(table, spec, RESIZE_PLAIN, tiled=True)
    dataset.context.execution_options.preserve_order = True
    return dataset


def tile_batch(batch: dict[str, np.ndarray], geometry: InputGeometry) -> dict[str, np.ndarray]:
    """A batch of lighting stacks -> the same batch with tiled ``test`` / ``golden`` pictures."""
    return {"row": batch["row"], "target": batch["target"],
            "test": assemble(batch["test"], geometry), "golden": assemble(batch["golden"], geometry)}


def _decoded(table: PairTable, spec: PipelineSpec, resample, *, tiled: bool) -> Dataset:
    """Decoded pairs of ``table``: lighting stacks, or tiled pictures (one task does both)."""
    if table.shards is not None:
        return _decoded_shards(table.shards, spec, resample, tiled=tiled)
    frame = table.pipeline_frame()
    blocks = [frame.iloc[start:start + ROWS_PER_BLOCK] for start in range(0, len(frame), ROWS_PER_BLOCK)]
    return ray.data.from_pandas(blocks).map_batches(
        _decode_batch, fn_kwargs={"geometry": spec.geometry, "resample": resample, "tiled": tiled},
        batch_size=DECODE_BATCH_ROWS, batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=min(spec.tasks, len(blocks))))


def _decode_batch(batch: dict[str, np.ndarray], geometry: InputGeometry, resample,
                  tiled: bool) -> dict[str, np.ndarray]:
    decoded = {"row": batch["row"], "target": batch["target"],
               "test": _read_sides(batch["test_paths"], geometry, resample),
               "golden": _read_sides(batch["golden_paths"], geometry, resample)}
    return tile_batch(decoded, geometry) if tiled else decoded


def _decoded_shards(shards: PackedShards, spec: PipelineSpec, resample, *, tiled: bool) -> Dataset:
    """Decoded pairs of a packed split: each task reads one row group of a shard (a few large
    reads, in the workers) and decodes its bytes."""
    groups = [{"shard": shards.files[index].location, "footer": shards.files[index].footer, "group": group}
              for index, group in shards.row_groups]
    return ray.data.from_items(groups, override_num_blocks=len(groups)).map_batches(
        _decode_row_group, fn_kwargs={"folder": shards.folder, "light_order": shards.light_order,
                                      "geometry": spec.geometry, "resample": resample, "tiled": tiled},
        batch_size=1, batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=min(spec.tasks, len(groups))))


def _decode_row_group(unit: dict[str, np.ndarray], folder: str, light_order: tuple[int, ...],
                      geometry: InputGeometry, resample, tiled: bool) -> dict[str, np.ndarray]:
    shard = ShardLocation(str(unit["shard"][0]), bytes(unit["footer"][0]))
    batch = read_row_group(shard, int(unit["group"][0]), [ROW, TARGET, TEST_IMAGES, GOLDEN_IMAGES])
    rows = batch.column(ROW).to_numpy()
    decoded = {"row": rows, "target": batch.column(TARGET).to_numpy()}
    for side, column in (("test", TEST_IMAGES), ("golden", GOLDEN_IMAGES)):
        decoded[side] = np.stack([
            read_stack(ordered(images, light_order), geometry, resample,
                       names=[f"{side} image {light + 1} of CSV row {row + 1} in {folder}"
                              for light in light_order])
            for row, images in zip(rows, batch.column(column).to_pylist(), strict=True)])
    return tile_batch(decoded, geometry) if tiled else decoded


def _read_sides(sides: np.ndarray, geometry: InputGeometry, resample) -> np.ndarray:
    """The lighting stacks of a batch's sides; images in a bucket are fetched FETCH_THREADS at a
    time (each is a request of tens of milliseconds), local files read in turn."""
    sides = [list(paths) for paths in sides]
    if not any(is_uri(path) for path in sides[0]):
        return np.stack([read_stack(paths, geometry, resample) for paths in sides])
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        return np.stack(list(pool.map(lambda paths: read_stack(paths, geometry, resample), sides)))


