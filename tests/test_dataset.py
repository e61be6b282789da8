"""The Ray Data pipeline: shapes, dtypes, per-epoch fpratio resampling, order, errors."""

import numpy as np
import pytest
from helpers import LIGHTS, write_pair_dataset

from oi_ray.config.schema import DatasetConfig
from oi_ray.data.assemble import InputGeometry, assemble, read_stack
from oi_ray.data.dataset import (
    PipelineSpec,
    decode_cache,
    evaluation_dataset,
    resample_counts,
    training_epoch,
)
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


def test_cache_holds_uint8_lighting_stacks(ray_local, table):
    cache = decode_cache(table, PipelineSpec.from_config(_config()), for_training=True)
    batch = cache.take_batch(4, batch_format="numpy")
    assert cache.count() == NUM_ROWS
    assert batch["test"].shape == (4, 2, 6, 8, 3) and batch["test"].dtype == np.uint8
    assert batch["golden"].shape == (4, 2, 6, 8, 3)


def test_training_epoch_resamples_every_epoch(ray_local, table):
    spec = PipelineSpec.from_config(_config())
    cache = decode_cache(table, spec, for_training=True)
    epochs = []
    for epoch in range(3):
        batches = _rows(training_epoch(cache, table.targets, spec, epoch=epoch, seed=7))
        assert batches[0]["test"].shape[1:] == (12, 8, 3)
        assert batches[0]["test"].dtype == np.uint8 and batches[0]["golden"].dtype == np.uint8
        epochs.append(np.concatenate([b["row"] for b in batches]))
        targets = np.concatenate([b["target"] for b in batches])
        assert len(targets) == NUM_ROWS
    all_targets = table.targets[np.concatenate(epochs)]
    assert all_targets.mean() == pytest.approx(0.5 / 1.5, abs=0.07)
    assert sorted(epochs[0]) != sorted(epochs[1]), "a fresh draw each epoch"
    again = np.concatenate([b["row"] for b in _rows(training_epoch(cache, table.targets, spec, epoch=1, seed=7))])
    assert again.tolist() == epochs[1].tolist(), "draw and order depend only on (seed, epoch)"
    assert list(epochs[0]) != sorted(epochs[0]), "rows are shuffled"


def test_training_epoch_with_augmentation(ray_local, table):
    config = _config()
    config.augmentation_config.augment = True
    spec = PipelineSpec.from_config(config)
    batches = _rows(training_epoch(decode_cache(table, spec, for_training=True), table.targets, spec,
                                   epoch=0, seed=1))
    assert sum(len(b["row"]) for b in batches) == NUM_ROWS
    shapes = {(b["test"].shape[1:], b["golden"].dtype.name) for b in batches}
    assert shapes == {((12, 8, 3), "uint8")}


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
    cached = _rows(evaluation_dataset(decode_cache(table, spec, for_training=False), spec))
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

    images = table.csv_path.parent / "images"
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"dataset:\n"
        f"  train_dataset: {{csv_path: {table.csv_path}, images_dir: {images}}}\n"
        f"  infer_dataset: {{csv_path: {table.csv_path}, images_dir: {images}}}\n"
        f"  image_ext: .png\n  input_map: {{LowAngleLight: 0, SolderLight: 1}}\n"
        f"  image_width: 8\n  image_height: 6\n  fpratio_sampling: 0.5\n"
    )
    assert main(["check_dataset", "-e", str(spec), "dataset.batch_size=16"]) == 0
    err = capsys.readouterr().err
    assert "model input per side: 3x12x8 float32 (LowAngleLight, SolderLight, linear)" in err
    assert f"train_dataset: {NUM_ROWS} pairs through Ray Data" in err
    assert "batches of (16, 12, 8, 3) uint8 -> model input (16, 3, 12, 8) float32" in err
    assert f"infer_dataset: {NUM_ROWS} pairs" in err and "dataset OK" in err

    assert main(["check_dataset", "-e", str(spec), "dataset.image_ext=.jpg"]) == 1
    assert "hint: images exist with extension .png: check dataset.image_ext (.jpg)" in capsys.readouterr().err
