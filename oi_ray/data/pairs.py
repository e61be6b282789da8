"""Pairs CSV loading and validation (TAO layout), done before any Ray work starts.

A pairs CSV has the columns ``input_path, golden_path, object_name, label`` (label optional
for inference; extra columns are kept). Each row names one test image set and its golden
image set; the image of lighting ``L`` is
``images_dir / input_path / f"{object_name}_{L}{image_ext}"`` (without ``_{L}`` when the spec
has no ``input_map``); an absolute ``input_path`` / ``golden_path`` overrides ``images_dir``.
The CSV and the images may sit in a bucket (``s3://``, ``gs://``: :mod:`oi_ray.storage`), and
a split may instead be read from the shards ``oi-ray pack`` wrote (``dataset.<split>.shards``:
:mod:`oi_ray.data.shards`).

Every problem (bad columns, labels, duplicated rows, missing or unreadable images) is
collected and reported together, naming the file, row, column and path. Images are found by
listing each folder once; local images are also opened (header and end marker), while in a
bucket that would be one request per image, so there an empty object is refused here and an
undecodable one when it is decoded, naming its URI.
"""

import difflib
import io
import logging
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from oi_ray.config.schema import DatasetConfig
from oi_ray.data.assemble import ImageSource, truncation_problem
from oi_ray.data.shards import PackedShards, open_packed, read_packed_sides
from oi_ray.errors import ConfigError, DataError
from oi_ray.storage import (
    check_store,
    file_size,
    is_folder,
    is_uri,
    join,
    list_files,
    list_tree,
    name,
    parent,
    read_bytes,
)

log = logging.getLogger(__name__)

PATH_COLUMNS = ("input_path", "golden_path", "object_name")
LABEL_COLUMN = "label"
PASS_LABEL = "PASS"
UNLABELED = -1
MAX_LISTED_PROBLEMS = 20
TRAILER_BYTES = 16  # read from the end of each image to spot a truncated file
LISTING_THREADS = 16  # folders of a bucket listed at once
TREE_LISTING_FOLDERS = 32  # more folders in a bucket than this: one listing of their parent


@dataclass(frozen=True)
class ImageNaming:
    """How a row's image files are named: the lightings in order and the extension."""

    lights: tuple[str, ...]  # empty: one image per side, named object_name + image_ext
    image_ext: str

    @classmethod
    def from_config(cls, dataset: DatasetConfig) -> "ImageNaming":
        return cls(lights=tuple(dataset.input_map or ()), image_ext=dataset.image_ext)

    def file_names(self, object_name: str) -> list[str]:
        """File names of one side's images, one per lighting, in lighting order."""
        if not self.lights:
            return [f"{object_name}{self.image_ext}"]
        return [f"{object_name}_{light}{self.image_ext}" for light in self.lights]


@dataclass
class PairTable:
    """A validated pairs CSV with the image paths of every row resolved."""

    source: str  # the CSV, or the folder of a packed split: a local path or a URI
    rows: pd.DataFrame  # the CSV as read: every column, as strings, in file order
    test_paths: list[list[str]]  # per row, one path per lighting (packed: where they were packed from)
    golden_paths: list[list[str]]
    targets: np.ndarray  # int8 per row: 1 defect, 0 PASS, UNLABELED (-1) without labels
    shards: PackedShards | None = None  # a packed split: the pipelines read the images from these

    @property
    def has_labels(self) -> bool:
        return LABEL_COLUMN in self.rows.columns

    def __len__(self) -> int:
        return len(self.rows)

    def require_column(self, column: str, key: str) -> None:
        """Raise ConfigError, naming the spec ``key`` that asks for it, when ``column`` is not in the CSV."""
        if column in self.rows.columns:
            return
        close = difflib.get_close_matches(column, list(self.rows.columns), n=1)
        raise ConfigError(f"{key}={column!r}: {self.source} has no column {column!r}; its columns are "
                          f"{list(self.rows.columns)}" + (f" (did you mean {close[0]!r}?)" if close else ""))

    def label_counts(self) -> dict[str, int]:
        """Rows per label value (PASS first), for logging."""
        if not self.has_labels:
            return {}
        counts = Counter(self.rows[LABEL_COLUMN])
        return dict(sorted(counts.items(), key=lambda item: (item[0] != PASS_LABEL, -item[1])))

    def distinct_goldens(self) -> int:
        """How many distinct golden sides (sets of lighting files) the pairs name."""
        return len({tuple(paths) for paths in self.golden_paths})

    def sides(self, indices: Sequence[int]) -> tuple[list[list[ImageSource]], list[list[ImageSource]]]:
        """The images of the rows ``indices`` (test sides, golden sides), one per lighting: their
        paths, or their encoded bytes from a packed split's shards."""
        if self.shards is not None:
            return read_packed_sides(self.shards, indices)
        return [self.test_paths[index] for index in indices], [self.golden_paths[index] for index in indices]

    def pipeline_frame(self) -> pd.DataFrame:
        """The columns the Ray Data pipeline needs: row, test_paths, golden_paths, target."""
        return pd.DataFrame({
            "row": np.arange(len(self.rows), dtype=np.int64),
            "test_paths": self.test_paths,
            "golden_paths": self.golden_paths,
            "target": self.targets,
        })


def first_configured_split(dataset: DatasetConfig, splits: Sequence[str]) -> str | None:
    """The first of ``splits`` (e.g. ``"test_dataset"``) whose pairs the spec names (by ``csv_path``
    or ``shards``)."""
    return next((split for split in splits if getattr(dataset, split).is_set), None)


def load_split(dataset: DatasetConfig, split: str, *, require_labels: bool = True) -> PairTable:
    """Load and validate the spec's ``dataset.<split>`` with its image naming: a CSV and its
    images, or the shards ``oi-ray pack`` wrote."""
    paths = getattr(dataset, split)
    if paths.shards:
        return load_packed(paths.shards, ImageNaming.from_config(dataset), require_labels=require_labels,
                           key=f"dataset.{split}.shards")
    return load_pairs(paths.csv_path, paths.images_dir, ImageNaming.from_config(dataset),
                      require_labels=require_labels, images_dir_key=f"dataset.{split}.images_dir",
                      csv_key=f"dataset.{split}.csv_path")


def load_pairs(
    csv_path: str | Path,
    images_dir: str | Path | None,
    naming: ImageNaming,
    *,
    require_labels: bool = True,
    images_dir_key: str = "images_dir",
    csv_key: str = "csv_path",
) -> PairTable:
    """Read and validate a pairs CSV; raise DataError listing every problem found.

    ``images_dir`` defaults to the CSV's folder; when given, it must be a folder (said once,
    naming ``images_dir_key``, instead of one missing image per row). Checks: required columns,
    empty cells, labels (exactly ``PASS`` or a defect name; near-misses like ``pass`` are
    errors), duplicated pairs, and that every lighting image of both sides exists and opens.
    """
    csv_path = str(csv_path)
    frame = _read_csv(csv_path, csv_key)
    root = str(images_dir) if images_dir else (csv_path.rsplit("/", 1)[0] if is_uri(csv_path)
                                               else os.path.dirname(os.path.abspath(csv_path)))
    problems = _Problems(csv_path)

    required = list(PATH_COLUMNS) + ([LABEL_COLUMN] if require_labels else [])
    missing = [column for column in required if column not in frame.columns]
    if missing:
        stripped = {str(c).strip(): c for c in frame.columns}
        hint = "; ".join(f"column {stripped[m]!r} has stray spaces" for m in missing if m in stripped)
        raise DataError(
            f"{csv_path}: missing column(s) {missing}; found {list(frame.columns)}"
            + (f" ({hint})" if hint else "")
        )
    _check_images_dir(frame, root, images_dir_key, csv_path)

    for column in required:
        for index in np.flatnonzero(frame[column].str.strip() == ""):
            problems.add(index, column, "is empty")
    targets = _label_targets(frame, problems)
    _check_duplicates(frame, problems)

    test_paths = _image_paths(frame, "input_path", root, naming)
    golden_paths = _image_paths(frame, "golden_path", root, naming)
    _check_images(test_paths, golden_paths, root, naming, problems)
    problems.raise_if_any()

    table = PairTable(csv_path, frame, test_paths, golden_paths, targets)
    counts = ", ".join(f"{label} {count}" for label, count in table.label_counts().items())
    log.info("%s: %d pairs%s", csv_path, len(table), f" ({counts})" if counts else "")
    return table


def load_packed(folder: str, naming: ImageNaming, *, require_labels: bool = True,
                key: str = "shards") -> PairTable:
    """A split that ``oi-ray pack`` wrote into ``folder``, checked as :func:`open_packed` says; its
    labels are checked as a CSV's (the images were checked when it was packed)."""
    manifest, shards, frame = open_packed(str(folder), naming.lights, key)
    if require_labels and LABEL_COLUMN not in frame.columns:
        raise DataError(f"{key}: the pairs in {folder} have no {LABEL_COLUMN!r} column "
                        f"({manifest.csv_path} had none when it was packed)")
    problems = _Problems(str(folder))
    targets = _label_targets(frame, problems)
    problems.raise_if_any()
    recorded = ImageNaming(naming.lights, manifest.image_ext)
    table = PairTable(shards.folder, frame, _image_paths(frame, "input_path", manifest.images_dir, recorded),
                      _image_paths(frame, "golden_path", manifest.images_dir, recorded), targets, shards)
    log.info("%s: %d pairs packed in %d shards from %s", shards.folder, len(table), len(shards.files),
             manifest.csv_path)
    return table


class _Problems:
    """Collects row problems of one CSV and raises them together as one DataError."""

    def __init__(self, csv_path: str) -> None:
        self.csv_path = csv_path
        self.messages: list[str] = []
        self.hints: list[str] = []

    def add(self, index: int, column: str, what: str) -> None:
        self.messages.append(f"row {index + 1} (line {index + 2}), column '{column}': {what}")

    def hint(self, text: str) -> None:
        if text not in self.hints:
            self.hints.append(text)

    def raise_if_any(self) -> None:
        if not self.messages:
            return
        shown = self.messages[:MAX_LISTED_PROBLEMS]
        more = len(self.messages) - len(shown)
        lines = [f"{self.csv_path}: {len(self.messages)} problem(s):", *(f"  - {m}" for m in shown)]
        if more:
            lines.append(f"  ... and {more} more")
        lines.extend(f"hint: {h}" for h in self.hints)
        raise DataError("\n".join(lines))


def _check_images_dir(frame: pd.DataFrame, root: str, key: str, csv_path: str) -> None:
    """A missing images folder, said once rather than as one missing image per row."""
    check_store(root, key)
    if is_folder(root):
        return
    paths = pd.concat([frame["input_path"], frame["golden_path"]])
    if all(_is_absolute(path) for path in paths):  # absolute paths do not use images_dir
        return
    what = "is a file, not a folder" if file_size(root) is not None else "does not exist"
    raise DataError(f"{key}: the images folder {root} {what} (the rows of {csv_path} are relative to it)")


def _read_csv(csv_path: str, key: str) -> pd.DataFrame:
    check_store(csv_path, key)
    if file_size(csv_path) is None:
        raise DataError(f"pairs CSV not found: {csv_path}")
    try:
        frame = pd.read_csv(io.BytesIO(read_bytes(csv_path)), dtype=str, keep_default_na=False,
                            skipinitialspace=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{csv_path}: cannot parse as CSV: {error}") from None
    if frame.empty:
        raise DataError(f"{csv_path}: has a header but no rows")
    return frame.reset_index(drop=True)


def _label_targets(frame: pd.DataFrame, problems: _Problems) -> np.ndarray:
    if LABEL_COLUMN not in frame.columns:
        return np.full(len(frame), UNLABELED, dtype=np.int8)
    labels = frame[LABEL_COLUMN]
    near_pass = (labels != PASS_LABEL) & (labels.str.strip().str.upper() == PASS_LABEL)
    for index in np.flatnonzero(near_pass):
        problems.add(index, LABEL_COLUMN, f"{labels.iloc[index]!r} is not exactly 'PASS' "
                     "(TAO would silently count it as a defect); fix the case/spaces")
    return (labels != PASS_LABEL).to_numpy(dtype=np.int8)


def _check_duplicates(frame: pd.DataFrame, problems: _Problems) -> None:
    first_seen: dict[tuple[str, ...], int] = {}
    for index, key in enumerate(map(tuple, frame[list(PATH_COLUMNS)].to_numpy())):
        first = first_seen.setdefault(key, index)
        if first != index:
            problems.add(index, "object_name", f"pair {key} repeats row {first + 1}")


def _is_absolute(path: str) -> bool:
    return os.path.isabs(path) or "://" in path


def _image_paths(frame: pd.DataFrame, column: str, root: str, naming: ImageNaming) -> list[list[str]]:
    """Each row's image locations; an absolute path or a URI in the CSV overrides ``root``."""
    return [
        [join(folder if _is_absolute(folder) else join(root, folder), file_name)
         for file_name in naming.file_names(object_name)]
        for folder, object_name in zip(frame[column], frame["object_name"], strict=True)
    ]


def _check_images(
    test_paths: list[list[str]],
    golden_paths: list[list[str]],
    root: str,
    naming: ImageNaming,
    problems: _Problems,
) -> None:
    """Report missing images per row and column, then unreadable ones: empty, or (local files,
    opened in threads) with a bad header or no end marker."""
    index = _DirectoryIndex()
    first_use: dict[str, tuple[int, str]] = {}
    for column, side in (("input_path", test_paths), ("golden_path", golden_paths)):
        for row, paths in enumerate(side):
            for path in paths:
                if path not in first_use:
                    first_use[path] = (row, column)
    index.list_all({parent(path) for path in first_use})
    existing = []
    for path, (row, column) in first_use.items():
        size = index.size(path)
        if size == 0:
            problems.add(row, column, f"cannot read image {path}: the file is empty")
        elif size is not None:
            existing.append(path)
        else:
            problems.add(row, column, f"image not found: {path}")
            hint = _missing_image_hint(path, root, naming, index)
            if hint:
                problems.hint(hint)
    existing = [path for path in existing if not is_uri(path)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for path, error in zip(existing, pool.map(_open_error, existing), strict=True):
            if error:
                row, column = first_use[path]
                problems.add(row, column, f"cannot read image {path}: {error}")


class _DirectoryIndex:
    """File names and sizes per folder, listed once: checks of many files stay cheap (one
    listing per folder, also in a bucket)."""

    def __init__(self) -> None:
        self._files: dict[str, dict[str, int]] = {}

    def list_all(self, folders: set[str]) -> None:
        """List ``folders`` now. In a bucket a dataset has a folder per board: past
        TREE_LISTING_FOLDERS of them, one flat listing of their common parent (a request per
        1,000 images) replaces a listing per folder; fewer are listed LISTING_THREADS at a time."""
        remote = sorted(folder for folder in folders if is_uri(folder) and folder not in self._files)
        common = os.path.commonprefix([f"{folder}/" for folder in remote]).rsplit("/", 1)[0]
        if len(remote) > TREE_LISTING_FOLDERS and common.count("/") > 2:  # a folder, not the scheme
            tree = list_tree(common)
            self._files.update({folder: tree.get(folder, {}) for folder in remote})
            return
        with ThreadPoolExecutor(max_workers=LISTING_THREADS) as pool:
            self._files.update(zip(remote, pool.map(list_files, remote), strict=True))

    def names(self, folder: str) -> dict[str, int]:
        if folder not in self._files:
            self._files[folder] = list_files(folder)
        return self._files[folder]

    def size(self, path: str) -> int | None:
        """The file's size, or None when its folder does not list it."""
        return self.names(parent(path)).get(name(path))


def _open_error(path: str) -> str | None:
    """Why the image cannot be read (bad header, truncated JPEG/PNG), or None when it opens.

    Cheap: reads the header and the file's last bytes, not the pixels.
    """
    try:
        with Image.open(path) as image:
            image_format = image.format
            if image.width < 1 or image.height < 1:
                return "empty image"
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - TRAILER_BYTES))
            return truncation_problem(image_format, handle.read())
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        return str(error) or type(error).__name__


def _missing_image_hint(path: str, root: str, naming: ImageNaming, index: _DirectoryIndex) -> str | None:
    """Explain a common cause of a missing image: nesting, extension, lighting names."""
    prefix = root.rstrip("/") + ("/" if is_uri(root) else os.sep)
    if path.startswith(prefix) and index.size(join(root, "images", path[len(prefix):])) is not None:
        return f"the images are one level deeper: set images_dir to {join(root, 'images')}"
    folder = parent(path)
    stem = Path(name(path)).stem
    same_stem = sorted(n for n in index.names(folder) if Path(n).stem == stem)
    if same_stem:
        return (f"images exist with extension {Path(same_stem[0]).suffix}: "
                f"check dataset.image_ext ({naming.image_ext})")
    if not naming.lights:
        return None
    object_name = stem.rsplit("_", 1)[0]
    lights = sorted({Path(n).stem[len(object_name) + 1:] for n in index.names(folder)
                     if n.startswith(f"{object_name}_")})
    if not lights:
        return None
    return (f"images exist under lightings {', '.join(lights)}; "
            f"dataset.input_map expects {', '.join(naming.lights)}")
