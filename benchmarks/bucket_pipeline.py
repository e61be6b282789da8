"""Packed shards vs one object per image, both in a bucket of a local S3-compatible server.

The data: ``--pairs`` pairs (TAO's layout: 4 lightings, 100x100 PNG) as the generator lays
them out: a folder per board (16 components each), each component's golden shared by every
board, as on a line. The generator draws ``--distinct`` pairs; further boards repeat their
bytes under their own folders, so every test shot is its own objects. Everything is put into
moto's S3 server on 127.0.0.1 before it listens (its own process, on the same cores as Ray's
workers, for every path alike; every measured read and write goes over HTTP).

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
import os
import sys
import tempfile
import time
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


def preload_listing(rows: pd.DataFrame, images: Path, csv: Path, prefix: str, listing: Path) -> int:
    """Write the server's preload file (``bucket/key<TAB>local file``): every pair's images under
    ``prefix``/images (the test shots under their own keys, each golden once) and ``csv`` as
    ``prefix``/pairs.csv. Returns the image objects listed."""
    sides = (("input_path", "source_path"), ("golden_path", "golden_path"))  # key's folder, bytes' folder
    objects = {f"{prefix}/images/{getattr(row, key)}/{row.object_name}_{light}.png":
               images / getattr(row, source) / f"{row.object_name}_{light}.png"
               for key, source in sides for row in rows.itertuples() for light in LIGHTS}
    objects_and_csv = [*objects.items(), (f"{prefix}/pairs.csv", csv)]
    listing.write_text("".join(f"{key}\t{path}\n" for key, path in objects_and_csv))
    return len(objects)


def _request_lines(log: Path) -> list[str]:
    """The server's log lines that are requests (``"GET /bucket/key HTTP/1.1" 200``)."""
    return [line for line in log.read_text().splitlines() if '"' in line]


def _requests(log: Path) -> int:
    return len(_request_lines(log))


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of the process ``pid`` so far (Linux's /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rows = build_dataset(tmp / "drawn", args)
        rows[["input_path", "golden_path", "object_name", "label"]].to_csv(tmp / "pairs.csv", index=False)
        objects = preload_listing(rows, tmp / "drawn" / "images", tmp / "pairs.csv", f"{BUCKET}/line3",
                                  tmp / "preload.tsv")
        start = time.perf_counter()
        with S3_SERVER.s3_server_process(tmp / "s3.log", preload=tmp / "preload.tsv") as (_, server):
            print(f"{args.pairs} pairs x {len(LIGHTS)} lightings, 100x100 PNG: {objects} objects "
                  f"({rows['golden_path'].nunique()} golden folders, {rows['input_path'].nunique()} board "
                  f"folders) put into the server in {time.perf_counter() - start:.0f} s", flush=True)
            measure(tmp, f"s3://{BUCKET}/line3", server)


def measure(tmp: Path, prefix: str, server: int) -> None:
    """Validation, pack and the three pipelines on the bucket's ``prefix`` (server log and local
    copies in ``tmp``); print each figure, with the requests and CPU seconds the server (process
    ``server``) spent."""
    config = DatasetConfig(input_map={light: index for index, light in enumerate(LIGHTS)},
                           num_input=len(LIGHTS), image_width=100, image_height=100, image_ext=".png")
    naming, spec = ImageNaming.from_config(config), PipelineSpec.from_config(config)
    log = tmp / "s3.log"
    before, server_before = _requests(log), _cpu_seconds(server)
    start = time.perf_counter()
    table = load_pairs(f"{prefix}/pairs.csv", f"{prefix}/images", naming)
    seconds = time.perf_counter() - start
    served = _request_lines(log)[before:]
    listings = sum("list-type=" in line for line in served)
    print(f"validation of {len(table)} pairs in the bucket: {seconds:.2f} s, {len(served)} requests "
          f"({listings} listings); the server: {_cpu_seconds(server) - server_before:.2f} CPU s", flush=True)

    with ray_session(RayConfig()):
        start = time.perf_counter()
        pack_split(table, "test_dataset", f"{prefix}/images", naming, f"{prefix}/packed",
                   shard_bytes=SHARD_BYTES, tasks=config.workers)
        print(f"pack, bucket -> bucket: {time.perf_counter() - start:.0f} s", flush=True)
        local = tmp / "packed"
        local.mkdir()
        bucket, key = pafs.FileSystem.from_uri(f"{prefix}/packed")
        pafs.copy_files(key, str(local), source_filesystem=bucket,
                        destination_filesystem=pafs.LocalFileSystem())
        rates = {}
        for name, source in (("shards on disk", load_packed(str(local), naming)),
                             ("shards in the bucket", load_packed(f"{prefix}/packed", naming)),
                             ("one object per image in the bucket", table)):
            before, server_before = _requests(log), _cpu_seconds(server)
            rates[name] = pairs_per_second(source, spec)
            print(f"  {name:<36} {rates[name]:7.1f} pairs/s; the server: {_requests(log) - before} requests, "
                  f"{_cpu_seconds(server) - server_before:.1f} CPU s", flush=True)
    packed = rates["shards in the bucket"]
    print(f"shards in the bucket vs one object per image: "
          f"{packed / rates['one object per image in the bucket']:.2f}x (target >= 3); "
          f"vs the shards on disk: {packed / rates['shards on disk']:.2f}x (target >= 0.8)")


if __name__ == "__main__":
    main()
