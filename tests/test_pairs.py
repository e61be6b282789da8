"""Pairs CSV validation: every problem reported with file, row, column and path."""

import numpy as np
import pytest
from helpers import LIGHTS, write_pair_dataset

from oi_ray.config.schema import DataPathFormat, DatasetConfig
from oi_ray.data.pairs import ImageNaming, load_pairs, load_split
from oi_ray.errors import ConfigError, DataError

NAMING = ImageNaming(lights=LIGHTS, image_ext=".png")
GOOD_ROWS = [
    ("boards/b1", "golden/p1", "R1@1", "PASS"),
    ("boards/b1", "golden/p1", "C2@1", "missing_solder"),
    ("boards/b2", "golden/p1", "R1@1", "PASS"),
    ("boards/b2", "golden/p1", "0101", "NO_PASS"),
]


def _load_error(csv_path, images_dir, naming=NAMING, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_pairs(csv_path, images_dir, naming, **kwargs)
    return str(info.value)


def test_valid_csv_resolves_paths_labels_and_keeps_strings(tmp_path):
    csv_path = write_pair_dataset(tmp_path, GOOD_ROWS)
    table = load_pairs(csv_path, tmp_path / "images", NAMING)
    assert len(table) == 4
    assert table.targets.tolist() == [0, 1, 0, 1]
    assert table.rows["object_name"].tolist()[3] == "0101", "object names keep leading zeros"
    images = tmp_path / "images"
    assert table.test_paths[0] == [str(images / "boards/b1/R1@1_LowAngleLight.png"),
                                   str(images / "boards/b1/R1@1_SolderLight.png")]
    assert table.golden_paths[1][1] == str(images / "golden/p1/C2@1_SolderLight.png")
    assert table.label_counts() == {"PASS": 2, "missing_solder": 1, "NO_PASS": 1}
    frame = table.pipeline_frame()
    assert frame.columns.tolist() == ["row", "test_paths", "golden_paths", "target"]
    assert frame["row"].tolist() == [0, 1, 2, 3]


def test_a_column_a_spec_key_asks_for_is_required_naming_the_key_file_and_columns(tmp_path):
    csv_path = write_pair_dataset(tmp_path, GOOD_ROWS)
    table = load_pairs(csv_path, tmp_path / "images", NAMING)
    table.require_column("label", "evaluate.group_by")
    with pytest.raises(ConfigError) as info:
        table.require_column("Label", "evaluate.group_by")
    assert str(info.value) == (f"evaluate.group_by='Label': {csv_path} has no column 'Label'; its columns are "
                               f"['input_path', 'golden_path', 'object_name', 'label'] (did you mean 'label'?)")
    with pytest.raises(ConfigError, match=r"has no column 'defect_type'; its columns are \[[^]]*\]$"):
        table.require_column("defect_type", "evaluate.group_by")


def test_images_dir_defaults_to_csv_folder_and_absolute_paths_override(tmp_path):
    images = tmp_path / "images"
    rows = [(str(images / "boards/b1"), "golden/p1", "R1@1", "PASS")]
    csv_path = write_pair_dataset(tmp_path, [("boards/b1", "golden/p1", "R1@1", "PASS")])
    csv_path.write_text(f"input_path,golden_path,object_name,label\n{','.join(rows[0])}\n")
    table = load_pairs(csv_path, images, NAMING)
    assert table.test_paths[0][0] == str(images / "boards/b1/R1@1_LowAngleLight.png")
    nested = tmp_path / "images" / "pairs.csv"
    nested.write_text("input_path,golden_path,object_name,label\nboards/b1,golden/p1,R1@1,PASS\n")
    assert load_pairs(nested, None, NAMING).golden_paths[0][0].startswith(str(images))


def test_no_input_map_means_one_image_per_side(tmp_path):
    csv_path = write_pair_dataset(tmp_path, GOOD_ROWS[:2], lights=())
    table = load_pairs(csv_path, tmp_path / "images", ImageNaming(lights=(), image_ext=".png"))
    assert table.test_paths[0] == [str(tmp_path / "images/boards/b1/R1@1.png")]


def test_labels_are_optional_for_inference(tmp_path):
    csv_path = write_pair_dataset(tmp_path, GOOD_ROWS)
    csv_path.write_text("input_path,golden_path,object_name,extra\n"
                        "boards/b1,golden/p1,R1@1,x\nboards/b2,golden/p1,0101,y\n")
    table = load_pairs(csv_path, tmp_path / "images", NAMING, require_labels=False)
    assert not table.has_labels
    assert table.targets.tolist() == [-1, -1]
    assert table.rows["extra"].tolist() == ["x", "y"]
    assert "missing column(s) ['label']" in _load_error(csv_path, tmp_path / "images")


def test_missing_columns_and_stray_spaces(tmp_path):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("input_path,golden_path,object_name, label\na,b,c,PASS\n")
    message = _load_error(csv_path, tmp_path)
    assert f"{csv_path}: missing column(s) ['label']" in message
    assert "column ' label' has stray spaces" in message


def test_every_row_problem_is_reported_together(tmp_path):
    csv_path = write_pair_dataset(tmp_path, GOOD_ROWS)
    with csv_path.open("a") as out:
        out.write("boards/b1,golden/p1,R1@1,pass\n")       # row 5: near-PASS label
        out.write("boards/b1,golden/p1,R1@1,PASS\n")       # row 6: duplicate of row 1
        out.write("boards/b3,golden/p1,,PASS\n")           # row 7: empty object_name
        out.write("boards/b9,golden/p1,R1@1,PASS \n")      # row 8: trailing space + missing files
    message = _load_error(csv_path, tmp_path / "images")
    assert message.startswith(f"{csv_path}: ")
    assert "row 5 (line 6), column 'label': 'pass' is not exactly 'PASS'" in message
    assert "row 6 (line 7), column 'object_name': pair ('boards/b1', 'golden/p1', 'R1@1') repeats row 1" in message
    assert "row 7 (line 8), column 'object_name': is empty" in message
    assert "row 8 (line 9), column 'label': 'PASS ' is not exactly 'PASS'" in message
    missing = tmp_path / "images/boards/b9/R1@1_LowAngleLight.png"
    assert f"row 8 (line 9), column 'input_path': image not found: {missing}" in message


def test_missing_golden_lighting_names_path_and_lists_found_lightings(tmp_path):
    csv_path = write_pair_dataset(tmp_path, GOOD_ROWS)
    (tmp_path / "images/golden/p1/C2@1_SolderLight.png").unlink()
    message = _load_error(csv_path, tmp_path / "images")
    assert "row 2 (line 3), column 'golden_path': image not found: " in message
    assert "C2@1_SolderLight.png" in message
    assert "hint: images exist under lightings LowAngleLight; dataset.input_map expects LowAngleLight, SolderLight" in message


def test_hint_for_images_nested_one_level_deeper(tmp_path):
    csv_path = write_pair_dataset(tmp_path, GOOD_ROWS)
    message = _load_error(csv_path, tmp_path)
    assert f"hint: the images are one level deeper: set images_dir to {tmp_path / 'images'}" in message
    assert message.count("image not found") == 14, "each unique missing file once"


def test_missing_images_dir_is_one_problem_naming_the_split_key(tmp_path):
    csv_path = write_pair_dataset(tmp_path, GOOD_ROWS)
    missing = tmp_path / "no_such_folder"
    dataset = DatasetConfig(test_dataset=DataPathFormat(csv_path=str(csv_path), images_dir=str(missing)),
                            input_map=dict.fromkeys(LIGHTS, 0), image_ext=".png")
    with pytest.raises(DataError) as info:
        load_split(dataset, "test_dataset")
    assert str(info.value) == (f"dataset.test_dataset.images_dir: the images folder {missing} does not exist "
                               f"(the rows of {csv_path} are relative to it)")
    assert "image not found" not in str(info.value)
    assert _load_error(csv_path, csv_path).startswith(f"images_dir: the images folder {csv_path} is a file")


def test_missing_images_dir_is_fine_when_every_path_is_absolute(tmp_path):
    images = tmp_path / "images"
    write_pair_dataset(tmp_path, GOOD_ROWS[:1])
    csv_path = tmp_path / "absolute.csv"
    csv_path.write_text(f"input_path,golden_path,object_name,label\n{images / 'boards/b1'},"
                        f"{images / 'golden/p1'},R1@1,PASS\n")
    table = load_pairs(csv_path, tmp_path / "unused", NAMING)
    assert table.golden_paths[0][0] == str(images / "golden/p1/R1@1_LowAngleLight.png")


def test_hint_for_wrong_extension(tmp_path):
    csv_path = write_pair_dataset(tmp_path, GOOD_ROWS)
    message = _load_error(csv_path, tmp_path / "images", ImageNaming(LIGHTS, ".jpg"))
    assert message.count("hint: images exist with extension .png: check dataset.image_ext (.jpg)") == 1


def test_corrupt_image_is_named(tmp_path):
    csv_path = write_pair_dataset(tmp_path, GOOD_ROWS)
    broken = tmp_path / "images/boards/b2/0101_SolderLight.png"
    broken.write_bytes(b"not an image")
    message = _load_error(csv_path, tmp_path / "images")
    assert f"row 4 (line 5), column 'input_path': cannot read image {broken}" in message


def test_empty_and_missing_csv(tmp_path):
    assert "pairs CSV not found" in _load_error(tmp_path / "nope.csv", tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("input_path,golden_path,object_name,label\n")
    assert "has a header but no rows" in _load_error(empty, tmp_path)


def test_many_problems_are_capped(tmp_path):
    rows = [(f"boards/b{i}", "golden/p1", "R1@1", "PASS") for i in range(30)]
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("input_path,golden_path,object_name,label\n"
                        + "\n".join(",".join(r) for r in rows) + "\n")
    message = _load_error(csv_path, tmp_path)
    assert f"{csv_path}: 62 problem(s):" in message
    assert "  ... and 42 more" in message
    assert np.sum([line.startswith("  - ") for line in message.splitlines()]) == 20
