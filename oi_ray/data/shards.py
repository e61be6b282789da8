"""Packed shards: a split's pairs as a few large Parquet files instead of millions of small images.

``oi-ray pack`` (:mod:`oi_ray.data.packing`) writes each split into its own folder (or bucket
prefix): Parquet shards of whole pairs, and ``manifest.json`` naming them. One Parquet row is
one pair: the CSV row's own columns (strings, as written), ``row`` (its index in the CSV),
``target`` (1 defect, 0 PASS, -1 unlabeled) and ``test_images`` / ``golden_images``, every
lighting's file as its encoded bytes, in the manifest's lighting order. The manifest is written
last and lists every shard with its size: a shard it does not list is not part of the split, so
an interrupted pack is never read as a whole one.

Reading a split takes one listing and one small read per shard (the CSV columns, not the
images); the Ray Data pipelines then read the shards in their workers
(:func:`oi_ray.data.dataset.evaluation_dataset`) and decode the bytes exactly as they decode
files, so a packed split scores and trains to the same numbers as its CSV and images. A
pipeline task is given its shard's footer (the driver read it), so it reads its row group
without reading the footer again: a bucket answers the object's size, then the row group's
columns as one range (Parquet's pre-buffering).
"""

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from oi_ray.errors import DataError
from oi_ray.storage import absolute, check_store, file_size, join, list_files, read_bytes, resolve

MANIFEST_NAME = "manifest.json"
FORMAT = "oi-ray packed pairs"
FORMAT_VERSION = 1
ROW, TARGET, TEST_IMAGES, GOLDEN_IMAGES = "row", "target", "test_images", "golden_images"
PAIR_COLUMNS = (ROW, TARGET, TEST_IMAGES, GOLDEN_IMAGES)  # beside the CSV's own columns
# pairs per Parquet row group: the unit a pipeline task reads, and a few pairs are read without their shard
ROW_GROUP_PAIRS = 128
READ_THREADS = 16  # shards whose CSV columns are read at once


@dataclass(frozen=True)
class ShardFile:
    """One shard as the manifest lists it."""

    name: str  # in the split's folder
    pairs: int
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """What a packed split holds and where it came from."""

    split: str  # the spec's dataset.<split> it was packed from
    csv_path: str
    images_dir: str
    lights: list[str]  # order of each side's images; empty: one image per side
    image_ext: str
    columns: list[str]  # the CSV's columns, in its order
    pairs: int
    defects: int
    files: list[ShardFile]
    created: str  # ISO 8601, UTC
    oi_ray_version: str

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}, indent=2).encode()

    @classmethod
    def from_json(cls, payload: bytes, location: str) -> "Manifest":
        try:
            fields = json.loads(payload)
            if fields.pop("format", None) != FORMAT or fields.pop("version", None) != FORMAT_VERSION:
                raise ValueError(f"not an {FORMAT!r} manifest of version {FORMAT_VERSION}")
            fields["files"] = [ShardFile(**entry) for entry in fields["files"]]
            return cls(**fields)
        except (ValueError, TypeError, KeyError) as error:
            raise DataError(f"{location}: not a manifest oi-ray pack wrote ({error})") from None


@dataclass(frozen=True)
class ShardLocation:
    """Where a shard is, and its footer: what a reader needs to read one row group."""

    location: str  # a local path or a URI
    footer: bytes  # the Parquet footer (:func:`footer_bytes`)


@dataclass(frozen=True)
class PackedShards:
    """A packed split as the pipelines read it."""

    folder: str  # a local path or a URI
    files: tuple[ShardLocation, ...]  # each shard
    row_groups: tuple[tuple[int, int], ...]  # every (shard, row group) there is: the pipelines' reads
    light_order: tuple[int, ...]  # per lighting of the spec, its index in the shards' image lists
    file_of_row: np.ndarray  # per CSV row: its shard, an index into files
    position_of_row: np.ndarray  # per CSV row: its row in that shard


def open_packed(folder: str, lights: Sequence[str],
                key: str) -> tuple[Manifest, PackedShards, pd.DataFrame]:
    """The manifest, the shards and every pair's CSV row (in CSV order, as strings) of the split
    packed in ``folder`` (the spec's ``key``), for a spec that reads the lightings ``lights``.

    Checks, before any Ray work: a manifest is there, every shard it lists is there at its size
    (one listing), the shards hold the spec's lightings and every CSV row exactly once."""
    folder = absolute(folder)
    check_store(folder, key)
    location = join(folder, MANIFEST_NAME)
    if file_size(location) is None:
        raise DataError(f"{key}: {folder} holds no {MANIFEST_NAME}; give a folder that oi-ray pack wrote "
                        "(pack.results_dir/<split>)")
    manifest = Manifest.from_json(read_bytes(location), location)
    listed = list_files(folder)
    for shard in manifest.files:
        found = listed.get(shard.name)
        if found != shard.bytes:
            what = ("is missing" if found is None
                    else f"has {found} bytes where the manifest says {shard.bytes}")
            raise DataError(f"{key}: shard {join(folder, shard.name)} {what}; pack the split again")
    light_order = _light_order(manifest, lights, key, folder)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        read = list(pool.map(lambda shard: _read_columns(join(folder, shard.name), [ROW, *manifest.columns]),
                             manifest.files))
    files = tuple(shard for _, shard in read)
    tables = [table for table, _ in read]
    row_groups = tuple((index, group) for index, (_, shard) in enumerate(read)
                       for group in range(footer(shard).num_row_groups))
    file_of_row = np.concatenate([np.full(len(table), index) for index, table in enumerate(tables)])
    position_of_row = np.concatenate([np.arange(len(table)) for table in tables])
    rows = pa.concat_tables(tables).to_pandas()
    order = np.argsort(rows[ROW].to_numpy(), kind="stable")
    if not np.array_equal(rows[ROW].to_numpy()[order], np.arange(manifest.pairs)):
        raise DataError(f"{key}: the shards in {folder} do not hold rows 0-{manifest.pairs - 1} of "
                        f"{manifest.csv_path} once each; pack the split again")
    frame = rows.iloc[order][manifest.columns].reset_index(drop=True)
    shards = PackedShards(folder, files, row_groups, light_order, file_of_row[order], position_of_row[order])
    return manifest, shards, frame


def read_packed_sides(shards: PackedShards,
                      indices: Sequence[int]) -> tuple[list[list[bytes]], list[list[bytes]]]:
    """The encoded images of the CSV rows ``indices`` (test sides, golden sides), in the spec's
    lighting order; reads only the row groups that hold them."""
    sides: dict[int, tuple[list[bytes], list[bytes]]] = {}
    by_file: dict[int, list[int]] = {}
    for index in indices:
        by_file.setdefault(int(shards.file_of_row[index]), []).append(int(index))
    for file_index, rows in by_file.items():
        shard = shards.files[file_index]
        with _open(shard.location) as handle:
            parquet = pq.ParquetFile(handle, metadata=footer(shard))
            starts = np.cumsum([0] + [parquet.metadata.row_group(group).num_rows
                                      for group in range(parquet.num_row_groups)])
            groups: dict[int, pa.Table] = {}
            for index in rows:
                position = int(shards.position_of_row[index])
                group = int(np.searchsorted(starts, position, side="right")) - 1
                if group not in groups:
                    groups[group] = parquet.read_row_group(group, columns=[TEST_IMAGES, GOLDEN_IMAGES])
                within = position - int(starts[group])
                sides[index] = tuple(ordered(groups[group][column][within].as_py(), shards.light_order)
                                     for column in (TEST_IMAGES, GOLDEN_IMAGES))
    return [sides[int(index)][0] for index in indices], [sides[int(index)][1] for index in indices]


def ordered(images: list[bytes], light_order: Sequence[int]) -> list[bytes]:
    """One side's images in the spec's lighting order."""
    return [images[index] for index in light_order]


def _light_order(manifest: Manifest, lights: Sequence[str], key: str, folder: str) -> tuple[int, ...]:
    if not lights or not manifest.lights:
        if len(lights) != len(manifest.lights):
            packed = ", ".join(manifest.lights) or "one image per side"
            wanted = ", ".join(lights) or "one image per side (no dataset.input_map)"
            raise DataError(f"{key}: the pairs in {folder} were packed with {packed}; "
                            f"the spec reads {wanted}")
        return (0,)
    missing = [light for light in lights if light not in manifest.lights]
    if missing:
        raise DataError(f"{key}: dataset.input_map names {', '.join(missing)}, which the pairs in {folder} "
                        f"were not packed with (they hold {', '.join(manifest.lights)})")
    return tuple(manifest.lights.index(light) for light in lights)


def read_row_group(shard: ShardLocation, group: int, columns: Sequence[str]) -> pa.Table:
    """``columns`` of one row group of ``shard`` (its footer not read again)."""
    with _open(shard.location) as handle:
        return pq.ParquetFile(handle, metadata=footer(shard)).read_row_group(group, columns=list(columns))


def footer_bytes(metadata: pq.FileMetaData) -> bytes:
    """A Parquet file's footer as bytes (a Ray task's argument); :func:`footer` reads it back."""
    sink = pa.BufferOutputStream()
    metadata.write_metadata_file(sink)
    return sink.getvalue().to_pybytes()


def footer(shard: ShardLocation) -> pq.FileMetaData:
    """The footer of ``shard``, from the bytes the driver read."""
    return pq.read_metadata(pa.BufferReader(shard.footer))


def _open(location: str) -> pa.NativeFile:
    filesystem, path = resolve(location)
    return filesystem.open_input_file(path)


def _read_columns(location: str, columns: list[str]) -> tuple[pa.Table, ShardLocation]:
    """``columns`` of one shard (Parquet reads only those columns' bytes), and the shard."""
    try:
        with _open(location) as handle:
            parquet = pq.ParquetFile(handle)
            shard = ShardLocation(location, footer_bytes(parquet.metadata))
            return parquet.read(columns=columns), shard
    except (OSError, pa.ArrowInvalid) as error:
        raise DataError(f"cannot read shard {location}: {str(error).splitlines()[0]}") from None
