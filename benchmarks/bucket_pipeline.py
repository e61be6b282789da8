"""Packed shards vs one object per image, both in a bucket of a local S3-compatible server.

The data: ``--pairs`` pairs (TAO's layout: 4 lightings, 100x100 PNG) as the generator lays
them out: a folder per board (16 components each), each component's golden shared by every
board, as on a line. The generator draws ``--distinct`` pairs; further boards repeat their
bytes under their own folders, so every test shot is its own objects. Everything is uploaded
to moto's S3 server on 127.0.0.1 (its own process, on the same cores as Ray's workers, for
every path alike).

Measured side by side in one run, on a local Ray with every core:

- **validation** of the bucket's CSV (``load_split``, what every task does before Ray work):
  seconds and the requests the server answered (listings vs object reads);
- **the decode-limited pipeline** (``evaluation_dataset``: fetch, decode, tile, in Ray Data's
  workers; the driver drains uint8 batches), pairs/s, for the per-image objects in the bucket,
  the packed shards in the bucket, and the same shards on the local disk;
- ``oi-ray pack``'s own time from the bucket into the bucket (the shards are then copied to the
  disk for the third path).

Targets (issue 25): shards in the bucket >= 3x the per-image path, and >= 0.8x the same shards
on disk; validation of 20,000 pairs within a few seconds.

    python benchmarks/bucket_pipeline.py --pairs 20000
"""

import argparse
import importlib
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs

from oi_ray.config.schema import DatasetConfig, RayConfig
from oi_ray.data.dataset import PipelineSpec, evaluation_dataset
from oi_ray.data.packing import pack_split
from oi_ray.data.pairs import ImageNaming, load_packed, load_pairs
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.runtime import ray_session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
S3_SERVER = importlib.import_module("s3_server")  # the tests' server: moto on 127.0.0.1

BUCKET = "aoi-bench"
LIGHTS = ("LowAngleLight", "SolderLight", "UniformLight", "WhiteLight")
UPLOAD_THREADS = 32
SHARD_BYTES = 128 * 2**20


def build_dataset(folder: Path, args: argparse.Namespace) -> pd.DataFrame:
    """The generator's pairs, their boards repeated under new folders up to ``args.pairs`` rows
    (``source_path``: the board folder the bytes come from)."""
    synthesize_dataset(folder, SyntheticSpec(num_pairs=args.distinct, lights=LIGHTS, width=100, height=100,
                                             image_ext=".png", seed=0))
    drawn = pd.concat([pd.read_csv(folder / f"{split}.csv", dtype=str) for split in ("train", "val", "test")],
                      ignore_index=True)
    copies = [drawn.assign(source_path=drawn["input_path"], input_path=drawn["input_path"] + f"-r{copy}")
              for copy in range(-(-args.pairs // len(drawn)))]
    return pd.concat(copies, ignore_index=True).iloc[:args.pairs]


def upload(rows: pd.DataFrame, images: Path, prefix: str) -> int:
    """Put every pair's images under ``prefix``: the test shots under their own keys, each
    golden once. Returns the objects written."""
    filesystem, root = pafs.FileSystem.from_uri(prefix)
    copies = {f"{root}/{row.input_path}/{row.object_name}_{light}.png":
              images / row.source_path / f"{row.object_name}_{light}.png"
              for row in rows.itertuples() for light in LIGHTS}
    copies.update({f"{root}/{row.golden_path}/{row.object_name}_{light}.png":
                   images / row.golden_path / f"{row.object_name}_{light}.png"
                   for row in rows.itertuples() for light in LIGHTS})

    def put(item: tuple[str, Path]) -> None:
        with filesystem.open_output_stream(item[0]) as out:
            out.write(item[1].read_bytes())

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(put, copies.items()))
    return len(copies)


def pairs_per_second(table, spec: PipelineSpec) -> float:
    start = time.perf_counter()
    pairs = sum(len(batch["row"]) for batch in evaluation_dataset(table, spec).iter_batches(
        batch_size=64, batch_format="numpy"))
    assert pairs == len(table), (pairs, len(table))
    return pairs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--distinct", type=int, default=1000, help="pairs the generator draws")
    args = parser.parse_args()
    config = DatasetConfig(input_map={light: index for index, light in enumerate(LIGHTS)},
                           num_input=len(LIGHTS), image_width=100, image_height=100, image_ext=".png")
    naming, spec = ImageNaming.from_config(config), PipelineSpec.from_config(config)
    with tempfile.TemporaryDirectory() as tmp, S3_SERVER.s3_server_process(Path(tmp) / "s3.log", BUCKET):
        log = Path(tmp) / "s3.log"
        rows = build_dataset(Path(tmp) / "drawn", args)
        prefix = f"s3://{BUCKET}/line3"
        start = time.perf_counter()
        objects = upload(rows, Path(tmp) / "drawn" / "images", f"{prefix}/images")
        csv = rows[["input_path", "golden_path", "object_name", "label"]].to_csv(index=False).encode()
        with pafs.FileSystem.from_uri(prefix)[0].open_output_stream(f"{BUCKET}/line3/pairs.csv") as out:
            out.write(csv)
        print(f"{args.pairs} pairs x {len(LIGHTS)} lightings, 100x100 PNG: {objects} objects "
              f"({rows['golden_path'].nunique()} golden folders, {rows['input_path'].nunique()} board "
              f"folders) uploaded in {time.perf_counter() - start:.0f} s", flush=True)

        before = len(log.read_text().splitlines())
        start = time.perf_counter()
        table = load_pairs(f"{prefix}/pairs.csv", f"{prefix}/images", naming)
        seconds = time.perf_counter() - start
        served = [line for line in log.read_text().splitlines()[before:] if '"' in line]
        listings = sum("list-type=" in line for line in served)
        print(f"validation of {len(table)} pairs in the bucket: {seconds:.2f} s, {len(served)} requests "
              f"({listings} listings)", flush=True)

        with ray_session(RayConfig()):
            start = time.perf_counter()
            pack_split(table, "test_dataset", f"{prefix}/images", naming, f"{prefix}/packed",
                       shard_bytes=SHARD_BYTES, tasks=config.workers)
            print(f"pack, bucket -> bucket: {time.perf_counter() - start:.0f} s", flush=True)
            local = Path(tmp) / "packed"
            local.mkdir()
            bucket, key = pafs.FileSystem.from_uri(f"{prefix}/packed")
            pafs.copy_files(key, str(local), source_filesystem=bucket,
                            destination_filesystem=pafs.LocalFileSystem())
            packed_in_bucket = load_packed(f"{prefix}/packed", naming)
            packed_on_disk = load_packed(str(local), naming)
            rates = {}
            for name, source in (("shards on disk", packed_on_disk),
                                 ("shards in the bucket", packed_in_bucket),
                                 ("one object per image in the bucket", table)):
                rates[name] = pairs_per_second(source, spec)
                print(f"  {name:<36} {rates[name]:7.1f} pairs/s", flush=True)
        packed = rates["shards in the bucket"]
        print(f"shards in the bucket vs one object per image: "
              f"{packed / rates['one object per image in the bucket']:.2f}x (target >= 3); "
              f"vs the shards on disk: {packed / rates['shards on disk']:.2f}x (target >= 0.8)")


if __name__ == "__main__":
    main()
