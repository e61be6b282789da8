"""``oi-ray pack`` and reading packed shards: the same pairs, pictures and rows as the files, and
clear errors for a broken or mismatched pack."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from oi_ray.cli import main
from oi_ray.config import load_config
from oi_ray.data.dataset import PipelineSpec, decode_cache, evaluation_dataset
from oi_ray.data.epochs import CacheReader, batches_of
from oi_ray.data.pairs import load_split
from oi_ray.data.shards import MANIFEST_NAME, ROW, TEST_IMAGES, open_packed, read_row_group
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.errors import ConfigError, DataError

pytestmark = pytest.mark.ray
LIGHTS = ("WhiteLight", "SolderLight")


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("set")
    return synthesize_dataset(root, SyntheticSpec(num_pairs=200, lights=LIGHTS, width=16, height=16,
                                                  image_ext=".png", seed=3)).spec_path


@pytest.fixture(scope="module")
def packed(spec, ray_local, tmp_path_factory) -> Path:
    """The pack's folder (pack.results_dir), shards of about 20 kB."""
    output = tmp_path_factory.mktemp("packed")
    assert main(["pack", "-e", str(spec), f"pack.results_dir={output}", "pack.shard_mb=0.02"]) == 0
    return output


def _frames(dataset) -> dict[str, np.ndarray]:
    batches = list(dataset.iter_batches(batch_size=32, batch_format="numpy"))
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def test_pack_writes_shards_a_manifest_and_a_spec_fragment(spec, packed):
    train = pd.read_csv(spec.parent / "train.csv", dtype=str)
    manifest = json.loads((packed / "train_dataset" / MANIFEST_NAME).read_text())
    assert manifest["format"] == "oi-ray packed pairs" and manifest["version"] == 1
    assert manifest["pairs"] == len(train) and manifest["defects"] == int((train["label"] != "PASS").sum())
    assert manifest["lights"] == list(LIGHTS) and manifest["columns"] == list(train.columns)
    assert manifest["csv_path"] == str(spec.parent / "train.csv")
    assert len(manifest["files"]) == 3, "about 20 kB each: a shard is at least a block of 64 pairs"
    assert sum(entry["pairs"] for entry in manifest["files"]) == len(train)
    on_disk = {path.name: path.stat().st_size for path in (packed / "train_dataset").glob("*.parquet")}
    assert on_disk == {entry["name"]: entry["bytes"] for entry in manifest["files"]}
    fragment = load_config([spec, packed / "dataset.yaml"]).dataset
    for split in ("train_dataset", "validation_dataset", "test_dataset"):
        paths = getattr(fragment, split)
        assert (paths.csv_path, paths.images_dir, paths.shards) == (None, None, str(packed / split))


def test_packed_splits_hold_the_same_rows_pictures_and_bytes(spec, packed, ray_local):
    from_files = load_config(spec)
    from_shards = load_config([spec, packed / "dataset.yaml"])
    for split in ("train_dataset", "test_dataset"):
        files, shards = load_split(from_files.dataset, split), load_split(from_shards.dataset, split)
        pd.testing.assert_frame_equal(shards.rows, files.rows)
        np.testing.assert_array_equal(shards.targets, files.targets)
        assert shards.source == str(packed / split) and shards.test_paths == files.test_paths

        pipeline = PipelineSpec.from_config(from_files.dataset)
        direct, unpacked = _frames(evaluation_dataset(files, pipeline)), _frames(evaluation_dataset(shards, pipeline))
        assert unpacked["row"].tolist() == list(range(len(files)))
        for key in ("target", "test", "golden"):
            np.testing.assert_array_equal(unpacked[key], direct[key])

    rows = [5, 0, len(shards) - 1]
    tests, goldens = shards.sides(rows)
    assert tests == [[Path(path).read_bytes() for path in files.test_paths[row]] for row in rows]
    assert goldens == [[Path(path).read_bytes() for path in files.golden_paths[row]] for row in rows]

    train = load_split(from_shards.dataset, "train_dataset")
    reader = CacheReader(decode_cache(train, pipeline, for_training=True))
    expected = CacheReader(decode_cache(load_split(from_files.dataset, "train_dataset"), pipeline, for_training=True))
    every = np.arange(len(train))
    for ours, theirs in zip(batches_of(reader, every, pipeline.geometry, batch_size=16),
                            batches_of(expected, every, pipeline.geometry, batch_size=16), strict=True):
        np.testing.assert_array_equal(ours["test"], theirs["test"])
        np.testing.assert_array_equal(ours["golden"], theirs["golden"])


def test_a_spec_may_read_some_of_the_packed_lightings(spec, packed, ray_local):
    one = ["dataset.input_map={SolderLight: 0}", "dataset.num_input=1"]
    files = load_split(load_config(spec, one).dataset, "test_dataset")
    config = load_config([spec, packed / "dataset.yaml"], one)
    shards = load_split(config.dataset, "test_dataset")
    pipeline = PipelineSpec.from_config(config.dataset)
    np.testing.assert_array_equal(_frames(evaluation_dataset(shards, pipeline))["test"],
                                  _frames(evaluation_dataset(files, pipeline))["test"])

    config = load_config([spec, packed / "dataset.yaml"], ["dataset.input_map={UniformLight: 0}", "dataset.num_input=1"])
    with pytest.raises(DataError, match="dataset.test_dataset.shards: dataset.input_map names UniformLight, which "
                                        "the pairs in .* were not packed with \\(they hold WhiteLight, SolderLight\\)"):
        load_split(config.dataset, "test_dataset")


def test_a_pipeline_task_reads_its_row_group_of_a_bucket_shard_without_its_footer(packed):
    from s3_server import requests_served, s3_server, upload_folder

    with s3_server("packs"):
        upload_folder(packed / "train_dataset", "s3://packs/train")
        _, shards, _ = open_packed("s3://packs/train", LIGHTS, "dataset.train_dataset.shards")
        shard, group = shards.files[1], 0
        with requests_served() as served:
            table = read_row_group(shard, group, [ROW, TEST_IMAGES])
    name = shard.location.rsplit("/", 1)[1]
    assert len(served) == 2, f"the object's size, then the row group's columns as one range: {served}"
    assert f"HEAD /packs/train/{name} " in served[0]
    assert f"GET /packs/train/{name} " in served[1] and '" 206 ' in served[1], "a range"
    local = pq.ParquetFile(packed / "train_dataset" / name)
    assert table.equals(local.read_row_group(group, columns=[ROW, TEST_IMAGES]))


def test_a_broken_pack_is_named_before_any_ray_work(spec, packed, tmp_path):
    copy = tmp_path / "test_dataset"
    copy.mkdir()
    for path in (packed / "test_dataset").iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    config = load_config(spec, ["dataset.test_dataset.csv_path=null", "dataset.test_dataset.images_dir=null",
                                f"dataset.test_dataset.shards={copy}"])
    shard = sorted(copy.glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=f"dataset.test_dataset.shards: shard {shard} has {shard.stat().st_size} "
                                        f"bytes where the manifest says {shard.stat().st_size + 10}"):
        load_split(config.dataset, "test_dataset")
    shard.unlink()
    with pytest.raises(DataError, match=f"dataset.test_dataset.shards: shard {shard} is missing"):
        load_split(config.dataset, "test_dataset")
    (copy / MANIFEST_NAME).unlink()
    with pytest.raises(DataError, match=f"dataset.test_dataset.shards: {copy} holds no manifest.json"):
        load_split(config.dataset, "test_dataset")


def test_shards_replace_the_csv_not_join_it(spec, packed):
    with pytest.raises(ConfigError, match="dataset.train_dataset.shards=.* is invalid: packed shards replace "
                                          "dataset.train_dataset.csv_path and dataset.train_dataset.images_dir"):
        load_config(spec, [f"dataset.train_dataset.shards={packed / 'train_dataset'}"])


def test_pack_refuses_a_csv_whose_columns_clash_before_ray_work(spec, tmp_path, capsys):
    frame = pd.read_csv(spec.parent / "test.csv", dtype=str).assign(row="1")
    frame.to_csv(tmp_path / "test.csv", index=False)
    assert main(["pack", "-e", str(spec), f"pack.results_dir={tmp_path / 'out'}",
                 f"dataset.test_dataset.csv_path={tmp_path / 'test.csv'}"]) == 1
    assert f"{tmp_path / 'test.csv'}: column(s) ['row'] clash with the columns pack adds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_packing_again_replaces_the_earlier_shards(spec, ray_local, tmp_path, capsys):
    only_train = ["dataset.validation_dataset.csv_path=null", "dataset.test_dataset.csv_path=null",
                  "dataset.infer_dataset.csv_path=null", f"pack.results_dir={tmp_path}"]
    assert main(["pack", "-e", str(spec), *only_train]) == 0
    first = sorted((tmp_path / "train_dataset").glob("*.parquet"))
    capsys.readouterr()
    assert main(["pack", "-e", str(spec), *only_train, "pack.shard_mb=0.02"]) == 0
    err = capsys.readouterr().err
    assert all(f"removed {path}, a shard of an earlier pack" in err for path in first)
    manifest = json.loads((tmp_path / "train_dataset" / MANIFEST_NAME).read_text())
    assert sorted(path.name for path in (tmp_path / "train_dataset").glob("*.parquet")) == \
        sorted(entry["name"] for entry in manifest["files"])
    assert len(manifest["files"]) > len(first) == 1
