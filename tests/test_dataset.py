"""The Ray Data pipeline: shapes, dtypes, per-epoch fpratio resampling, order, errors."""

from pathlib import Path

import numpy as np
import pytest
from helpers import LIGHTS, write_pair_dataset

from oi_ray.config.schema import DatasetConfig
from oi_ray.data import dataset as dataset_module
from oi_ray.data.assemble import InputGeometry, assemble, read_stack
from oi_ray.data.dataset import DecodedCache, PipelineSpec, decode_cache, evaluation_dataset
from oi_ray.data.epochs import CacheReader, batches_of, epoch_plan, resample_counts, training_batches
from oi_ray.data.pairs import ImageNaming, load_pairs
from oi_ray.errors import DataError, find_user_error

pytestmark = pytest.mark.ray
NUM_ROWS = 120


def _config(**overrides) -> DatasetConfig:
    config = DatasetConfig(input_map={light: i for i, light in enumerate(LIGHTS)}, num_input=2,
                           image_width=8, image_height=6, image_ext=".png", fpratio_sampling=0.5)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    rows = [(f"boards/b{i // 6}", "golden/p1", f"R{i % 6}@1", "PASS" if i % 4 else "solder_bridge")
            for i in range(NUM_ROWS)]
    csv_path = write_pair_dataset(root, rows, size=(10, 7))
    return load_pairs(csv_path, root / "images", ImageNaming.from_config(_config()))


def _rows(dataset) -> list[dict]:
    return list(dataset.iter_batches(batch_size=32, batch_format="numpy"))


def test_resample_counts_match_fpratio_semantics():
    targets = np.array([0] * 9000 + [1] * 1000, dtype=np.int8)
    for fpratio in (0.1, 0.5, 1.0):
        counts = resample_counts(targets, fpratio, np.random.default_rng(0))
        assert counts.sum() == len(targets), "epoch length equals dataset size"
        drawn_defects = counts[targets == 1].sum() / counts.sum()
        assert drawn_defects == pytest.approx(fpratio / (1 + fpratio), abs=0.01)


def test_resample_needs_both_classes():
    with pytest.raises(DataError, match="found 3 PASS and 0 defect rows"):
        resample_counts(np.zeros(3, dtype=np.int8), 0.1, np.random.default_rng(0))


def _epoch_rows(cache, spec, epoch, seed=7, batch_size=8, world=1, rank=0) -> tuple[np.ndarray, np.ndarray]:
    """(rows, tiled test pictures) of one rank's epoch, as a training worker gets them."""
    plan = epoch_plan(cache.targets, spec.fpratio_sampling, seed=seed, epoch=epoch, world=world,
                      batch_size=batch_size)[rank]
    batches = list(training_batches(cache, CacheReader(cache), plan, spec, batch_size=batch_size,
                                    seed=(seed, epoch, rank)))
    assert all(len(b["row"]) == batch_size for b in batches), "whole batches only"
    return np.concatenate([b["row"] for b in batches]), np.concatenate([b["test"] for b in batches])


def test_cache_holds_uint8_lighting_stacks(ray_local, table):
    cache = decode_cache(table, PipelineSpec.from_config(_config()), for_training=True)
    assert len(cache) == NUM_ROWS and cache.targets.tolist() == table.targets.tolist()
    stacks = CacheReader(cache).gather(np.array([5, 0, 5]))
    assert stacks["row"].tolist() == [5, 0, 5]
    assert stacks["test"].shape == (3, 2, 6, 8, 3) and stacks["test"].dtype == np.uint8
    np.testing.assert_array_equal(stacks["golden"][1], read_stack(table.golden_paths[0], _geometry()))


def _geometry() -> InputGeometry:
    return InputGeometry.from_config(_config())


def test_training_epoch_resamples_every_epoch(ray_local, table):
    spec = PipelineSpec.from_config(_config())
    cache = decode_cache(table, spec, for_training=True)
    epochs = []
    for epoch in range(3):
        rows, test = _epoch_rows(cache, spec, epoch)
        assert test.shape[1:] == (12, 8, 3) and test.dtype == np.uint8
        assert len(rows) == NUM_ROWS, "120 rows drawn = 15 whole batches of 8"
        epochs.append(rows)
    all_targets = table.targets[np.concatenate(epochs)]
    assert all_targets.mean() == pytest.approx(0.5 / 1.5, abs=0.07)
    assert sorted(epochs[0]) != sorted(epochs[1]), "a fresh draw each epoch"
    assert _epoch_rows(cache, spec, 1)[0].tolist() == epochs[1].tolist(), "draw and order depend only on (seed, epoch)"
    assert list(epochs[0]) != sorted(epochs[0]), "rows are shuffled"


def test_epochs_do_not_depend_on_cache_blocks_or_their_order(ray_local, table, monkeypatch):
    """Seeded epochs repeat exactly whatever the number of blocks and the order Ray finished them."""
    spec = PipelineSpec.from_config(_config())
    monkeypatch.setattr(dataset_module, "ROWS_PER_BLOCK", 16)
    many = decode_cache(table, spec, for_training=True)
    assert len(many.blocks) >= 4
    backwards = DecodedCache(list(reversed(many.blocks)), many.targets)
    monkeypatch.setattr(dataset_module, "ROWS_PER_BLOCK", 128)
    one = decode_cache(table, spec, for_training=True)
    assert len(one.blocks) == 1
    reference_rows, reference_test = _epoch_rows(one, spec, 4)
    for cache in (many, backwards):
        rows, test = _epoch_rows(cache, spec, 4)
        assert rows.tolist() == reference_rows.tolist()
        np.testing.assert_array_equal(test, reference_test)


def test_ranks_get_equal_disjoint_shares_of_one_plan():
    targets = np.array([0, 0, 0, 1] * 25, dtype=np.int8)
    plan = epoch_plan(targets, 0.5, seed=3, epoch=0, world=3, batch_size=8)
    assert plan.shape == (3, 32), "100 draws -> 4 whole batches of 8 per rank, 4 dropped"
    single = epoch_plan(targets, 0.5, seed=3, epoch=0, world=1, batch_size=8)
    assert plan.ravel().tolist() == single.ravel()[:96].tolist(), "the same draw, cut into shares"


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """Synthetic PCB pictures (the hand-made ``table`` has flat images that flips cannot change)."""
    from oi_ray.config import load_config
    from oi_ray.data.pairs import load_split
    from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset

    spec = synthesize_dataset(tmp_path_factory.mktemp("synthetic"), SyntheticSpec(
        num_pairs=60, lights=LIGHTS, width=16, height=16, image_ext=".png", seed=2)).spec_path
    config = load_config(spec, ["dataset.fpratio_sampling=0.5"])
    return config.dataset, load_split(config.dataset, "train_dataset")


def test_training_augmentation_is_applied_to_both_sides_alike(ray_local, textured):
    config, table = textured
    augmentation = config.augmentation_config
    augmentation.augment = True
    spec = PipelineSpec.from_config(config)
    cache = decode_cache(table, spec, for_training=True)
    plan = epoch_plan(cache.targets, spec.fpratio_sampling, seed=1, epoch=0, world=1, batch_size=8)[0]
    reader = CacheReader(cache)
    expected = list(batches_of(reader, plan, spec.geometry, batch_size=8))
    augmented = list(training_batches(cache, reader, plan, spec, batch_size=8, seed=(1, 0, 0)))
    assert [b["row"].tolist() for b in augmented] == [b["row"].tolist() for b in expected]
    test, before = (np.concatenate([b["test"] for b in batches]) for batches in (augmented, expected))
    assert test.shape == before.shape == (len(plan), 32, 16, 3) and test.dtype == np.uint8
    changed = np.mean([not np.array_equal(a, b) for a, b in zip(test, before, strict=True)])
    assert changed > 0.9, f"TAO's default augmentation changed only {changed:.0%} of the pairs"

    # Only a horizontal flip, always: every lighting image of both sides is mirrored.
    augmentation.with_random_crop = augmentation.with_random_blur = False
    augmentation.random_rotate.enable = augmentation.random_color.enable = False
    augmentation.random_flip.hflip_probability, augmentation.random_flip.vflip_probability = 1.0, 0.0
    flip_only = PipelineSpec.from_config(config)
    flipped = list(training_batches(cache, reader, plan, flip_only, batch_size=8, seed=(1, 0, 0)))
    for side in ("test", "golden"):
        mirrored = np.concatenate([b[side] for b in flipped])
        original = np.concatenate([b[side] for b in expected])
        np.testing.assert_array_equal(mirrored, original[:, :, ::-1])


@pytest.mark.parametrize("concat", ["linear", "grid"])
def test_evaluation_reads_every_pair_once_in_order(ray_local, table, concat):
    config = _config(concat_type=concat)
    config.grid_map.x, config.grid_map.y = 2, 1
    spec = PipelineSpec.from_config(config)
    batches = _rows(evaluation_dataset(table, spec))
    rows = np.concatenate([b["row"] for b in batches])
    assert rows.tolist() == list(range(NUM_ROWS))
    test = np.concatenate([b["test"] for b in batches])
    geometry = InputGeometry.from_config(config)
    channels, height, width = geometry.input_shape
    assert test.shape == (NUM_ROWS, height, width, channels)
    expected = assemble(read_stack(table.test_paths[57], geometry)[None], geometry)[0]
    np.testing.assert_array_equal(test[57], expected)
    targets = np.concatenate([b["target"] for b in batches])
    assert targets.tolist() == table.targets.tolist()


def test_evaluation_from_cache_matches_direct(ray_local, table):
    spec = PipelineSpec.from_config(_config())
    direct = _rows(evaluation_dataset(table, spec))
    reader = CacheReader(decode_cache(table, spec, for_training=False))
    cached = list(batches_of(reader, np.arange(NUM_ROWS), spec.geometry, batch_size=32))
    np.testing.assert_array_equal(np.concatenate([b["golden"] for b in direct]),
                                  np.concatenate([b["golden"] for b in cached]))


def test_corrupt_image_during_decoding_names_the_file(ray_local, tmp_path):
    rows = [("boards/b1", "golden/p1", f"R{i}@1", "PASS") for i in range(4)]
    csv_path = write_pair_dataset(tmp_path, rows, size=(10, 7), image_ext=".jpg")
    config = _config(image_ext=".jpg")
    table = load_pairs(csv_path, tmp_path / "images", ImageNaming.from_config(config))
    broken = tmp_path / "images/boards/b1/R2@1_SolderLight.jpg"
    data = broken.read_bytes()
    broken.write_bytes(data[:200] + bytes(len(data) - 202) + data[-2:])  # header and end marker intact
    with pytest.raises(Exception) as info:
        _rows(evaluation_dataset(table, PipelineSpec.from_config(config)))
    user_error = find_user_error(info.value)
    assert isinstance(user_error, DataError)
    assert str(user_error).startswith(f"cannot decode image {broken}")


def test_check_dataset_cli_validates_and_runs_every_split(ray_local, table, tmp_path, capsys):
    from oi_ray.cli import main

    images = Path(table.source).parent / "images"
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"dataset:\n"
        f"  train_dataset: {{csv_path: {table.source}, images_dir: {images}}}\n"
        f"  infer_dataset: {{csv_path: {table.source}, images_dir: {images}}}\n"
        f"  image_ext: .png\n  input_map: {{LowAngleLight: 0, SolderLight: 1}}\n"
        f"  image_width: 8\n  image_height: 6\n  fpratio_sampling: 0.5\n"
    )
    assert main(["check_dataset", "-e", str(spec), "dataset.batch_size=16"]) == 0
    err = capsys.readouterr().err
    assert "model input per side: 3x12x8 float32 (LowAngleLight, SolderLight, linear)" in err
    assert "train_dataset: decoded by Ray Data, one epoch's 112 pairs" in err, "7 whole batches of 16"
    assert "batches of (16, 12, 8, 3) uint8 -> model input (16, 3, 12, 8) float32" in err
    assert f"infer_dataset: through Ray Data, {NUM_ROWS} pairs" in err and "dataset OK" in err

    # Unseeded (train.seed=-1) with augmentation: previews with seed 0.
    assert main(["check_dataset", "-e", str(spec), "dataset.batch_size=16", "train.seed=-1",
                 "dataset.augmentation_config.augment=true"]) == 0
    assert "train_dataset: decoded by Ray Data, one epoch's 112 pairs" in capsys.readouterr().err

    assert main(["check_dataset", "-e", str(spec), "dataset.image_ext=.jpg"]) == 1
    assert "hint: images exist with extension .png: check dataset.image_ext (.jpg)" in capsys.readouterr().err
