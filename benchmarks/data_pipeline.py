"""Pairs/s of the Ray Data pipeline vs plain PIL decoding of the same files in one process.

Both sides decode the same synthetic dataset (4 lightings at 100x100 by default, test and
golden per pair, page cache warmed first). The baseline decodes every pair's images with
PIL in a single Python loop: the decode limit of one process. The pipeline is
``evaluation_dataset``: Ray Data decodes and tiles in parallel tasks and the driver iterates
uint8 picture batches (normalisation happens on the model's device, see
``oi_ray.model.inputs``). Ray start-up is excluded; the first ("cold")
pass includes worker start-up, the second ("warm") is the steady state. Also reported: a
training epoch from the decoded cache (the epoch plan's resample and shuffle, then batches
gathered from the object-store cache and tiled, as a training worker reads them).

    python benchmarks/data_pipeline.py --pairs 2000
"""

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from oi_ray.config.schema import DatasetConfig, RayConfig
from oi_ray.data.assemble import InputGeometry, read_stack
from oi_ray.data.dataset import PipelineSpec, decode_cache, evaluation_dataset
from oi_ray.data.epochs import CacheReader, epoch_plan, training_batches
from oi_ray.data.pairs import ImageNaming, PairTable, load_pairs
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.runtime import ray_session

LIGHTS = ("LowAngleLight", "SolderLight", "UniformLight", "WhiteLight")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--lights", type=int, default=4, choices=range(1, 5))
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    lights = LIGHTS[: args.lights]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        synthesize_dataset(root, SyntheticSpec(num_pairs=args.pairs, lights=lights,
                                               width=args.size, height=args.size, seed=0))
        config = DatasetConfig(input_map={light: i for i, light in enumerate(lights)},
                               num_input=len(lights), image_width=args.size, image_height=args.size)
        table = _all_splits(root, config)
        spec = PipelineSpec.from_config(config)
        _warm_page_cache(table)

        baseline = _pairs_per_second(len(table), lambda: _decode_in_one_process(table, spec.geometry))
        with ray_session(RayConfig()):
            def iterate(dataset):
                return lambda: sum(len(b["row"]) for b in dataset.iter_batches(
                    batch_size=args.batch_size, batch_format="numpy"))
            cold = _pairs_per_second(len(table), iterate(evaluation_dataset(table, spec)))
            warm = _pairs_per_second(len(table), iterate(evaluation_dataset(table, spec)))
            cache = decode_cache(table, spec, for_training=True)
            plan = epoch_plan(cache.targets, spec.fpratio_sampling, seed=0, epoch=0, world=1,
                              batch_size=args.batch_size)[0]
            reader = CacheReader(cache)
            epoch = _pairs_per_second(len(plan), lambda: sum(len(b["row"]) for b in training_batches(
                cache, reader, plan, spec, batch_size=args.batch_size, seed=(0, 0, 0))))

    print(f"pairs: {len(table)}, lightings: {len(lights)}, image: {args.size}x{args.size}, "
          f"batch: {args.batch_size}")
    print(f"plain PIL decode, 1 process   : {baseline:8.1f} pairs/s")
    print(f"Ray Data pipeline, cold       : {cold:8.1f} pairs/s   ratio {cold / baseline:.2f}")
    print(f"Ray Data pipeline, warm       : {warm:8.1f} pairs/s   ratio {warm / baseline:.2f}")
    print(f"training epoch from the cache : {epoch:8.1f} pairs/s   ratio {epoch / baseline:.2f}")


def _all_splits(root: Path, config: DatasetConfig) -> PairTable:
    """One table over the train, val and test rows (the benchmark only needs many pairs)."""
    frames = [pd.read_csv(root / f"{split}.csv", dtype=str) for split in ("train", "val", "test")]
    combined = root / "all.csv"
    pd.concat(frames, ignore_index=True).to_csv(combined, index=False)
    return load_pairs(combined, root / "images", ImageNaming.from_config(config))


def _warm_page_cache(table: PairTable) -> None:
    for paths in (*table.test_paths, *table.golden_paths):
        for path in paths:
            Path(path).read_bytes()


def _decode_in_one_process(table: PairTable, geometry: InputGeometry) -> int:
    for test, golden in zip(table.test_paths, table.golden_paths, strict=True):
        read_stack(test, geometry)
        read_stack(golden, geometry)
    return len(table)


def _pairs_per_second(expected: int, run) -> float:
    start = time.perf_counter()
    seen = run()
    elapsed = time.perf_counter() - start
    if seen != expected:
        raise RuntimeError(f"saw {seen} pairs, expected {expected}")
    return seen / elapsed


if __name__ == "__main__":
    main()
