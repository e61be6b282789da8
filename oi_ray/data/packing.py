"""Writing packed shards (the format: :mod:`oi_ray.data.shards`) with Ray Data.

Ray Data tasks fetch each pair's encoded images (from a disk or a bucket, never decoded) and
write Parquet shards of about ``shard_bytes`` straight into the split's folder; the driver then
lists what was written, writes the manifest (atomically, last) and removes the shards of an
earlier pack of the same folder, which the new manifest no longer names.
"""

import datetime
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data.datasource import FilenameProvider

from oi_ray import __version__
from oi_ray.data.pairs import ImageNaming, PairTable
from oi_ray.data.shards import (
    GOLDEN_IMAGES,
    MANIFEST_NAME,
    PAIR_COLUMNS,
    ROW,
    ROW_GROUP_PAIRS,
    TARGET,
    TEST_IMAGES,
    Manifest,
    ShardFile,
)
from oi_ray.errors import DataError
from oi_ray.storage import is_uri, join, list_files, read_bytes, resolve, write_atomically

log = logging.getLogger(__name__)

FETCH_ROWS = 64  # pairs a task fetches at a time: the blocks the shards are made of
FETCH_THREADS = 16  # requests in flight per task when the images sit in a bucket
SHARD_SUFFIX = ".parquet"


class _ShardNames(FilenameProvider):
    """``part-<write id>-<task>``: unique per pack, so an earlier pack's shards stay readable
    until the new manifest replaces theirs."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{write_uuid}-{task_index:05d}{SHARD_SUFFIX}"


def check_packable(table: PairTable) -> None:
    """Refuse a CSV whose own columns would collide with the shards' pair columns."""
    clashes = [column for column in table.rows.columns if column in PAIR_COLUMNS]
    if clashes:
        raise DataError(f"{table.source}: column(s) {clashes} clash with the columns pack adds "
                        f"{list(PAIR_COLUMNS)}; rename them in the CSV")


def pack_split(table: PairTable, split: str, images_dir: str, naming: ImageNaming, folder: str, *,
               shard_bytes: int, tasks: int) -> Manifest:
    """Write ``table``'s pairs into ``folder`` as shards of about ``shard_bytes`` and a manifest;
    ``split`` and ``images_dir`` are recorded in it."""
    check_packable(table)
    before = set(list_files(folder))
    frame = table.rows.assign(**{ROW: np.arange(len(table), dtype=np.int64), TARGET: table.targets,
                                 TEST_IMAGES: table.test_paths, GOLDEN_IMAGES: table.golden_paths})
    blocks = [frame.iloc[start:start + FETCH_ROWS] for start in range(0, len(frame), FETCH_ROWS)]
    filesystem, path = resolve(folder)
    ray.data.from_pandas(blocks).map_batches(
        _fetch_batch, fn_kwargs={"columns": list(table.rows.columns)}, batch_size=FETCH_ROWS,
        batch_format="pandas", compute=ray.data.TaskPoolStrategy(size=max(1, min(tasks, len(blocks)))),
    ).write_parquet(path, filesystem=filesystem, min_bytes_per_file=shard_bytes,
                    row_group_size=ROW_GROUP_PAIRS, filename_provider=_ShardNames())
    written = {name: size for name, size in list_files(folder).items()
               if name.endswith(SHARD_SUFFIX) and name not in before}
    files = [ShardFile(name, _pairs_in(join(folder, name)), size) for name, size in sorted(written.items())]
    if sum(shard.pairs for shard in files) != len(table):
        raise DataError(f"packing {table.source} into {folder}: the shards hold "
                        f"{sum(shard.pairs for shard in files)} pairs, not {len(table)}; was the folder "
                        "written by another pack at the same time?")
    manifest = Manifest(
        split=split, csv_path=table.source, images_dir=images_dir, lights=list(naming.lights),
        image_ext=naming.image_ext, columns=[str(column) for column in table.rows.columns], pairs=len(table),
        defects=int((table.targets == 1).sum()) if table.has_labels else 0, files=files,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), oi_ray_version=__version__)
    write_atomically(join(folder, MANIFEST_NAME), manifest.to_json())
    for stale in sorted(name for name in before if name.endswith(SHARD_SUFFIX) and name not in written):
        filesystem.delete_file(f"{path}/{stale}")
        log.info("removed %s, a shard of an earlier pack", join(folder, stale))
    return manifest


def _fetch_batch(batch: pd.DataFrame, columns: list[str]) -> pa.Table:
    """A batch of pairs, their images' locations replaced by the encoded bytes, as the shards
    hold them."""
    paths = [*batch[TEST_IMAGES], *batch[GOLDEN_IMAGES]]
    if any(is_uri(side[0]) for side in paths):
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            images = list(pool.map(lambda side: [read_bytes(location) for location in side], paths))
    else:
        images = [[read_bytes(location) for location in side] for side in paths]
    sides = pa.list_(pa.binary())
    return pa.table({**{column: pa.array(batch[column], pa.string()) for column in columns},
                     ROW: pa.array(batch[ROW], pa.int64()), TARGET: pa.array(batch[TARGET], pa.int8()),
                     TEST_IMAGES: pa.array(images[:len(batch)], sides),
                     GOLDEN_IMAGES: pa.array(images[len(batch):], sides)})


def _pairs_in(location: str) -> int:
    """The pairs a shard holds, from its footer."""
    filesystem, path = resolve(location)
    with filesystem.open_input_file(path) as handle:
        return pq.ParquetFile(handle).metadata.num_rows
