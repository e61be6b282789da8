"""Synthetic PCB datasets: TAO layout, determinism, spec, errors and difficulty."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from oi_ray.cli import main
from oi_ray.config import load_config
from oi_ray.console import program
from oi_ray.data.pairs import ImageNaming, load_pairs
from oi_ray.data.synthetic import DEFECTS, SyntheticSpec, synthesize_dataset
from oi_ray.errors import DataError

SMALL = SyntheticSpec(num_pairs=40, width=24, height=24, seed=3)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, synthesize_dataset(root, SMALL)


def test_layout_is_tao(small):
    root, summary = small
    config = load_config(summary.spec_path)
    naming = ImageNaming.from_config(config.dataset)
    boards = {}
    for split in ("train", "val", "test"):
        frame = pd.read_csv(root / f"{split}.csv", dtype=str)
        assert frame.columns.tolist() == ["input_path", "golden_path", "object_name", "label"]
        assert (frame.label == "PASS").any() and (frame.label != "PASS").any()
        assert set(frame.label) <= {"PASS", *DEFECTS}
        assert frame.object_name.str.fullmatch(r"[RCDQU]\d+@1").all()
        assert frame.golden_path.str.fullmatch(r"golden/P\d+").all()
        boards[split] = set(frame.input_path)
        table = load_pairs(root / f"{split}.csv", root / "images", naming)  # every image exists
        with Image.open(table.test_paths[0][0]) as image:
            assert image.size == (24, 24) and image.mode == "RGB"
    assert not (boards["train"] & boards["val"]) and not (boards["val"] & boards["test"])
    assert sum(sum(labels.values()) for labels in summary.rows.values()) == 40


def test_spec_points_at_the_dataset(small):
    root, summary = small
    config = load_config(summary.spec_path)
    assert config.dataset.train_dataset.csv_path == str(root / "train.csv")
    assert config.dataset.test_dataset.images_dir == str(root / "images")
    assert list(config.dataset.input_map) == list(SMALL.lights)
    assert config.dataset.num_input == 4 and config.dataset.image_width == 24
    assert config.train.results_dir == str(root / "results/train")


def test_deterministic_given_seed(small, tmp_path):
    root, _ = small
    again = tmp_path / "again"
    synthesize_dataset(again, SMALL)
    for name in ("train.csv", "val.csv", "test.csv", "images/boards/B0001/" + pd.read_csv(
            root / "train.csv", dtype=str).query("input_path == 'boards/B0001'").object_name.iloc[0]
            + "_SolderLight.jpg"):
        assert (root / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    synthesize_dataset(other, SyntheticSpec(num_pairs=40, width=24, height=24, seed=4))
    assert (other / "train.csv").read_bytes() != (root / "train.csv").read_bytes()


def test_custom_lights_png_and_cli(tmp_path, capsys):
    output = tmp_path / "two"
    assert main(["synthesize", "--output", str(output), "--num-pairs", "20", "--lights", "Top,Side",
                 "--image-ext", ".png", "--size", "16", "20"]) == 0
    printed = capsys.readouterr().out
    assert f"spec: {output / 'spec.yaml'}" in printed and "train.csv:" in printed
    assert f"next: {program()} check_dataset -e {output / 'spec.yaml'}\n" in printed
    config = load_config(output / "spec.yaml")
    assert list(config.dataset.input_map) == ["Top", "Side"] and config.dataset.image_ext == ".png"
    table = load_pairs(output / "val.csv", output / "images", ImageNaming.from_config(config.dataset))
    assert table.test_paths[0][1].endswith("_Side.png")
    with Image.open(table.golden_paths[0][0]) as image:
        assert image.size == (16, 20)


@pytest.mark.parametrize(("spec", "message"), [
    (SyntheticSpec(num_pairs=5), "--num-pairs 5: need at least 20"),
    (SyntheticSpec(defect_ratio=1.0), "--defect-ratio 1.0: expected 0 < ratio < 1"),
    (SyntheticSpec(lights=("A", "A")), "names repeat"),
    (SyntheticSpec(lights=("A/B",)), "not usable in file names"),
    (SyntheticSpec(image_ext=".bmp"), "--image-ext .bmp: expected .jpg or .png"),
    (SyntheticSpec(width=8), "width and height must be >= 16"),
])
def test_bad_options(tmp_path, spec, message):
    with pytest.raises(DataError, match=message):
        synthesize_dataset(tmp_path / "x", spec)


def test_refuses_non_empty_output(small):
    root, _ = small
    with pytest.raises(DataError, match="exists and is not empty; .* --overwrite"):
        synthesize_dataset(root, SMALL)


def test_pixel_difference_does_not_solve_it(tmp_path):
    """Benign variation (misalignment, gain, noise) hides most defects from a global score;
    gross ones (a missing part) still stand out, so the scores are not just noise."""
    spec = SyntheticSpec(num_pairs=300, width=64, height=64, seed=0)
    synthesize_dataset(tmp_path, spec)
    frame = pd.concat([pd.read_csv(tmp_path / f"{s}.csv", dtype=str) for s in ("train", "val", "test")])
    scores = []
    for row in frame.itertuples():
        def side(folder, name=row.object_name):
            return np.stack([np.asarray(Image.open(tmp_path / "images" / folder / f"{name}_{light}.jpg"),
                                        dtype=np.float32) / 255 for light in spec.lights])
        scores.append(np.abs(side(row.input_path) - side(row.golden_path)).mean())
    scores = np.asarray(scores)
    labels = frame.label.to_numpy()
    pixel_auroc = roc_auc_score(labels != "PASS", scores)
    assert 0.55 < pixel_auroc < 0.85
    gross = np.isin(labels, ["PASS", "missing_component"])
    assert roc_auc_score(labels[gross] != "PASS", scores[gross]) > pixel_auroc
