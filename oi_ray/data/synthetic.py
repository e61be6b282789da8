"""Synthetic multi-lighting PCB inspection datasets in TAO's layout, with a ready spec.

A few part designs each place a list of components (``R12@1``, ``C3@1``, ``Q2@1`` ...);
every (part, component) has one golden shot, shared by all boards of that part; every
(board, component) is one test shot and one CSV row. PASS shots differ from the golden by
placement and solder tolerance, camera misalignment, lighting gain and sensor noise; defect
shots add one defect of random severity. Rows are split 70/15/15 by board. Every image's
random draw derives from ``(seed, ids)``, so the output depends only on the options.
"""

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from oi_ray.console import command
from oi_ray.data.synthetic_render import Component, Shot, render
from oi_ray.errors import DataError
from oi_ray.fileio import write_atomically

DEFECTS = ("missing_component", "shifted_component", "rotated_component", "solder_bridge",
           "insufficient_solder", "scratch", "foreign_particle", "tombstone")
SPLITS = (("train", 0.70), ("val", 0.15), ("test", 0.15))
PARTS = ("P100", "P200")
KINDS = "RRCCCDQU"
LIGHT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


@dataclass(frozen=True)
class SyntheticSpec:
    """Options of ``oi-ray synthesize``."""

    num_pairs: int = 600
    defect_ratio: float = 0.25
    lights: tuple[str, ...] = ("LowAngleLight", "SolderLight", "UniformLight", "WhiteLight")
    image_ext: str = ".jpg"
    width: int = 100
    height: int = 100
    seed: int = 0


@dataclass(frozen=True)
class SynthesisSummary:
    """What :func:`synthesize_dataset` wrote."""

    output: Path
    spec_path: Path
    rows: dict[str, dict[str, int]]  # split -> label -> count
    images: int
    seconds: float

    def describe(self) -> str:
        lines = [f"wrote {self.images} images and {sum(map(sum, map(dict.values, self.rows.values())))} "
                 f"pairs to {self.output} in {self.seconds:.1f} s"]
        for split, labels in self.rows.items():
            defects = sum(count for label, count in labels.items() if label != "PASS")
            lines.append(f"  {split}.csv: {labels.get('PASS', 0)} PASS, {defects} defect "
                         f"({', '.join(f'{k} {v}' for k, v in sorted(labels.items()) if k != 'PASS')})")
        lines.append(f"spec: {self.spec_path}")
        lines.append(f"next: {command('check_dataset', '-e', self.spec_path)}")
        return "\n".join(lines)


def synthesize_dataset(output: str | Path, spec: SyntheticSpec, overwrite: bool = False) -> SynthesisSummary:
    """Render images, write ``train/val/test.csv`` and ``spec.yaml`` under ``output``."""
    start = time.perf_counter()
    _validate(spec)
    output = Path(output).resolve()
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise DataError(f"{output} exists and is not empty; choose another --output or pass --overwrite")
    images_dir = output / "images"

    per_board = min(16, max(2, spec.num_pairs // 10))
    boards = math.ceil(spec.num_pairs / per_board)
    designs = {part: _design(spec.seed, index, per_board) for index, part in enumerate(PARTS)}
    board_split = _split_boards(boards)
    rows = []
    for board in range(boards):
        part = PARTS[board % len(PARTS)]
        for name, _ in designs[part][: min(per_board, spec.num_pairs - board * per_board)]:
            rows.append({"input_path": f"boards/B{board:04d}", "golden_path": f"golden/{part}",
                         "object_name": name, "label": "PASS", "split": board_split[board]})
    frame = pd.DataFrame(rows)
    _assign_defects(frame, spec)

    written = 0
    for part, components in designs.items():
        for name, component in components:
            rng = np.random.default_rng([spec.seed, 1, PARTS.index(part), _id(name)])
            shot = Shot(gains=tuple(rng.uniform(0.97, 1.03, len(spec.lights))), noise=1.5)
            written += _save(render(component, shot, spec.lights, (spec.width, spec.height), rng),
                             images_dir / "golden" / part, name, spec)
    lookup = {name: component for components in designs.values() for name, component in components}
    for index, row in frame.iterrows():
        rng = np.random.default_rng([spec.seed, 2, index])
        shot = _test_shot(lookup[row.object_name], row.label, spec, rng)
        images = render(lookup[row.object_name], shot, spec.lights, (spec.width, spec.height), rng)
        written += _save(images, images_dir / row.input_path, row.object_name, spec)

    counts = {}
    for split, _ in SPLITS:
        part = frame[frame.split == split].drop(columns="split")
        write_atomically(output / f"{split}.csv", part.to_csv(index=False).encode())
        counts[split] = part.label.value_counts().to_dict()
    spec_path = output / "spec.yaml"
    write_atomically(spec_path, _spec_yaml(output, spec).encode())
    return SynthesisSummary(output, spec_path, counts, written, time.perf_counter() - start)


def _validate(spec: SyntheticSpec) -> None:
    problems = []
    if spec.num_pairs < 20:
        problems.append(f"--num-pairs {spec.num_pairs}: need at least 20")
    if not 0 < spec.defect_ratio < 1:
        problems.append(f"--defect-ratio {spec.defect_ratio}: expected 0 < ratio < 1")
    if not spec.lights:
        problems.append("--lights: give at least one lighting name")
    if len(set(spec.lights)) != len(spec.lights):
        problems.append(f"--lights {','.join(spec.lights)}: names repeat")
    bad = [name for name in spec.lights if not LIGHT_NAME.match(name)]
    if bad:
        problems.append(f"--lights: {bad} not usable in file names (letters, digits, '-')")
    if spec.image_ext not in (".jpg", ".png"):
        problems.append(f"--image-ext {spec.image_ext}: expected .jpg or .png")
    if min(spec.width, spec.height) < 16:
        problems.append(f"--size {spec.width} {spec.height}: width and height must be >= 16")
    if problems:
        raise DataError("invalid synthesize options:\n" + "\n".join(f"  - {p}" for p in problems))


def _design(seed: int, part: int, count: int) -> list[tuple[str, Component]]:
    """A part's component placements: unique names and nominal geometry."""
    rng = np.random.default_rng([seed, 0, part])
    components, used = [], set()
    for _ in range(count):
        kind = KINDS[rng.integers(len(KINDS))]
        number = int(rng.integers(1, 99))
        while f"{kind}{number}" in used:
            number += 1
        used.add(f"{kind}{number}")
        if kind in "QU":
            component = Component(kind, rng.uniform(34, 40), rng.uniform(20, 24), rng.uniform(7, 9))
        else:
            component = Component(kind, rng.uniform(50, 62), rng.uniform(26, 34), rng.uniform(5, 8))
        components.append((f"{kind}{number}@1", component))
    return components


def _split_boards(boards: int) -> list[str]:
    val = max(1, round(boards * SPLITS[1][1]))
    test = max(1, round(boards * SPLITS[2][1]))
    train = boards - val - test
    return ["train"] * train + ["val"] * val + ["test"] * test


def _assign_defects(frame: pd.DataFrame, spec: SyntheticSpec) -> None:
    """Mark about ``defect_ratio`` of each split's rows as defects (at least one each)."""
    rng = np.random.default_rng([spec.seed, 3])
    for split, _ in SPLITS:
        index = frame.index[frame.split == split].to_numpy()
        count = min(len(index) - 1, max(1, round(len(index) * spec.defect_ratio)))
        chosen = rng.choice(index, size=count, replace=False)
        frame.loc[chosen, "label"] = [DEFECTS[i] for i in rng.integers(len(DEFECTS), size=count)]


def _test_shot(component: Component, label: str, spec: SyntheticSpec, rng: np.random.Generator) -> Shot:
    """Benign variation for every shot, plus the labelled defect with random severity."""
    severity = rng.uniform(0.3, 1.0)
    two_ends = component.kind in "RCD"
    shot = dict(
        offset=tuple(rng.uniform(-1.5, 1.5, 2)), angle=rng.uniform(-2, 2),
        camera=tuple(rng.uniform(-1.5, 1.5, 2) * min(spec.width, spec.height) / 100),
        solder=tuple(rng.uniform(0.85, 1.15, 2)),
        gains=tuple(rng.uniform(0.9, 1.1, len(spec.lights))), noise=rng.uniform(2.0, 4.0),
    )
    spot = tuple(rng.uniform(-35, 35, 2))
    if label == "missing_component":
        shot["missing"] = True
    elif label == "shifted_component":
        axis = rng.integers(2)
        move = rng.choice([-1, 1]) * (0.12 + 0.18 * severity) * component.length
        shot["offset"] = (move, 0.0) if axis == 0 else (0.0, move * 0.6)
    elif label == "rotated_component":
        shot["angle"] = rng.choice([-1, 1]) * (8 + 17 * severity)
    elif label == "solder_bridge":
        shot["bridge"] = 1.5 + 3.5 * severity
    elif label == "insufficient_solder":
        low = rng.uniform(0.0, 0.35)
        shot["solder"] = (low, low if rng.random() < 0.4 else shot["solder"][1])
    elif label == "scratch":
        shot["scratch"] = (*spot, rng.uniform(0, 180), (20 + 40 * severity), 1.0 + 1.2 * severity)
    elif label == "foreign_particle":
        radius = 1.5 + 3.5 * severity
        colour = tuple(rng.uniform(0.2, 0.9, 3))
        shot["particle"] = (*spot, radius, radius * rng.uniform(0.4, 1.0), *colour)
    elif label == "tombstone":
        if two_ends:
            shot["tombstone"] = int(rng.choice([-1, 1]))
        else:
            shot["missing"] = True  # a three-lead part cannot stand on one end; it falls off
    return Shot(**shot)


def _save(images: list[np.ndarray], folder: Path, object_name: str, spec: SyntheticSpec) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    options = {"quality": 90} if spec.image_ext == ".jpg" else {}
    for light, pixels in zip(spec.lights, images, strict=True):
        Image.fromarray(pixels).save(folder / f"{object_name}_{light}{spec.image_ext}", **options)
    return len(images)


def _id(name: str) -> int:
    return int.from_bytes(name.encode(), "little") % (2**63)


def _spec_yaml(output: Path, spec: SyntheticSpec) -> str:
    lights = "\n".join(f"    {name}: {index}" for index, name in enumerate(spec.lights))
    grid = "  grid_map:\n    x: 2\n    y: 2\n" if len(spec.lights) == 4 else ""
    splits = "".join(
        f"  {key}:\n    csv_path: {output / csv}\n    images_dir: {output / 'images'}\n"
        for key, csv in (("train_dataset", "train.csv"), ("validation_dataset", "val.csv"),
                         ("test_dataset", "test.csv"), ("infer_dataset", "test.csv")))
    return f"""# Written by `oi-ray synthesize` (num_pairs={spec.num_pairs}, defect_ratio={spec.defect_ratio},
# lights={','.join(spec.lights)}, image_ext={spec.image_ext}, size={spec.width}x{spec.height},
# seed={spec.seed}).
# A TAO optical_inspection spec: train with `oi-ray train -e {output / 'spec.yaml'}`.
results_dir: {output / 'results'}
model:
  model_type: Siamese_3
  model_backbone: custom
  embedding_vectors: 5
  margin: 2.0
dataset:
{splits}  image_ext: {spec.image_ext}
  batch_size: 16
  workers: 2
  fpratio_sampling: 0.1
  num_input: {len(spec.lights)}
  input_map:
{lights}
  concat_type: linear
{grid}  image_width: {spec.width}
  image_height: {spec.height}
  augmentation_config:
    rgb_input_mean: [0.485, 0.456, 0.406]
    rgb_input_std: [0.229, 0.224, 0.225]
train:
  num_epochs: 5
  checkpoint_interval: 1
  validation_interval: 1
  seed: 1234
  results_dir: ${{results_dir}}/train
  optim:
    type: Adam
    lr: 0.0005
  loss: contrastive
evaluate:
  checkpoint: ${{results_dir}}/train/oi_model_latest.pth
  results_dir: ${{results_dir}}/evaluate
inference:
  checkpoint: ${{results_dir}}/train/oi_model_latest.pth
  results_dir: ${{results_dir}}/inference
export:
  checkpoint: ${{results_dir}}/train/oi_model_latest.pth
  onnx_file: ${{results_dir}}/export/oi_model.onnx
  results_dir: ${{results_dir}}/export
"""
