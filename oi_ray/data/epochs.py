"""Training epochs from a :class:`DecodedCache`: TAO's fpratio resample, shuffled, in equal shares.

Every rank derives the same epoch plan from ``(seed, epoch)`` alone: which rows (drawn with
replacement, TAO's weighted sampler) in which order, cut into one equal share of whole
batches per rank. So all ranks run the same number of steps without exchanging anything,
and a seeded run repeats exactly whatever the number of cache blocks or the order in which
Ray finished them. A rank gathers its batches straight from the cache (zero-copy reads from
its node's object store, one copy per batch); with training augmentation, Ray Data tasks
augment the rank's share in parallel, in plan order.
"""

from collections.abc import Iterator

import numpy as np
import ray
import ray.data

from oi_ray.config.schema import AugmentationConfig
from oi_ray.data import augment
from oi_ray.data.assemble import InputGeometry
from oi_ray.data.dataset import DecodedCache, PipelineSpec, tile_batch
from oi_ray.errors import DataError

Batch = dict[str, np.ndarray]


class CacheReader:
    """Rows of a :class:`DecodedCache` by CSV row index, read zero-copy from the object store."""

    def __init__(self, cache: DecodedCache) -> None:
        self.blocks: list[Batch] = ray.get(list(cache.blocks))
        self._block_of = np.full(len(cache), -1, dtype=np.int64)
        self._offset_of = np.zeros(len(cache), dtype=np.int64)
        for index, block in enumerate(self.blocks):
            self._block_of[block["row"]] = index
            self._offset_of[block["row"]] = np.arange(len(block["row"]))
        if np.any(self._block_of < 0):
            raise RuntimeError(f"decode cache lost rows {np.flatnonzero(self._block_of < 0)[:5].tolist()}")

    def __len__(self) -> int:
        return len(self._block_of)

    def gather(self, rows: np.ndarray) -> Batch:
        """The lighting stacks of ``rows``, in that order (repeats allowed)."""
        picks = list(zip(self._block_of[rows], self._offset_of[rows], strict=True))
        return {name: np.stack([self.blocks[block][name][offset] for block, offset in picks])
                for name in ("row", "target", "test", "golden")}


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


def epoch_plan(targets: np.ndarray, fpratio: float, *, seed: int, epoch: int, world: int,
               batch_size: int) -> np.ndarray:
    """The rows of epoch ``epoch`` (0-based) for each rank: ``(world, steps * batch_size)``.

    Drawn with replacement as TAO's sampler does, shuffled, and cut into ``world`` equal
    shares of whole batches (the remainder is dropped, like ``drop_last``). Depends only on
    ``(seed, epoch)``: every rank computes the same plan, and a resumed run sees the same
    epochs as an uninterrupted one.
    """
    rng = np.random.default_rng([seed, epoch])
    counts = resample_counts(targets, fpratio, rng)
    rows = rng.permutation(np.repeat(np.arange(len(targets)), counts))
    steps = len(rows) // (world * batch_size)
    return rows[:world * steps * batch_size].reshape(world, steps * batch_size)


def batches_of(reader: CacheReader, rows: np.ndarray, geometry: InputGeometry, *,
               batch_size: int) -> Iterator[Batch]:
    """Tiled batches of ``rows`` in order, gathered in this process (the last may be smaller)."""
    for start in range(0, len(rows), batch_size):
        yield tile_batch(reader.gather(rows[start:start + batch_size]), geometry)


def training_batches(cache: DecodedCache, reader: CacheReader, rows: np.ndarray, spec: PipelineSpec, *,
                     batch_size: int, seed: tuple[int, ...]) -> Iterator[Batch]:
    """One rank's training batches for planned ``rows`` (a whole number of batches).

    Without augmentation they are gathered here; with it, Ray Data tasks gather, augment
    (one draw per pair, seeded by ``seed`` and the batch's place in the plan) and tile them,
    delivered in plan order.
    """
    if spec.augmentation is None:
        yield from batches_of(reader, rows, spec.geometry, batch_size=batch_size)
        return
    planned = ray.data.from_items([{"index": index, "rows": chunk}
                                   for index, chunk in enumerate(rows.reshape(-1, batch_size))])
    augmented = planned.map_batches(
        _augment_planned, batch_size=1, batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=spec.tasks),
        fn_kwargs={"cache": cache, "geometry": spec.geometry, "augmentation": spec.augmentation,
                   "seed": seed})
    augmented.context.execution_options.preserve_order = True
    yield from augmented.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)


def _augment_planned(planned: Batch, cache: DecodedCache, geometry: InputGeometry,
                     augmentation: AugmentationConfig, seed: tuple[int, ...]) -> Batch:
    """Ray Data task: gather one planned batch from the cache, augment each pair, tile."""
    reader = CacheReader(cache)
    (index,), (rows,) = planned["index"], planned["rows"]
    stacks = reader.gather(rows)
    rng = np.random.default_rng([*seed, int(index)])
    draws = [augment.draw(augmentation, geometry.height, geometry.width, rng) for _ in rows]
    pairs = [augment.augment_pair(test, golden, pair_draw)
             for test, golden, pair_draw in zip(stacks["test"], stacks["golden"], draws, strict=True)]
    stacks["test"] = np.stack([test for test, _ in pairs])
    stacks["golden"] = np.stack([golden for _, golden in pairs])
    return tile_batch(stacks, geometry)
