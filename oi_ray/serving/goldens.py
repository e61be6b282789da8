"""The golden library's store: a part's golden shots registered once, shared by every replica.

``serve.golden_store`` is a folder or a URI that pyarrow's filesystems open (``s3://``,
``gs://``, ``file://``); every replica reads and writes the same one. Per golden id::

    <store>/<id>/golden.json                   the manifest: what the id is now (its version)
    <store>/<id>/<version>/<shot>.<k>.img      the uploaded images, as uploaded (k: lighting)
    <store>/<id>/<version>/<model sha>.npy     a model's features of every shot
    <store>/<id>/stats/<replica>.json          what each replica scored against it

A golden becomes visible when its manifest is written, and the manifest is written last, by a
single rename (local) or a single object PUT (object stores): a half-written golden is never
seen. Two uploads of one id write two versions, and the manifest written last decides; a
version no manifest names is never read. Features are keyed by the SHA-256 of the model that
computed them, so a new model recomputes them from the kept images.
"""

import contextlib
import io
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from oi_ray.errors import DataError

MANIFEST = "golden.json"
# a part reference as AOI programs write them (C12, 0603-10k, R1.2): one path segment, no dots alone
GOLDEN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class GoldenIdError(ValueError):
    """An id that cannot name a golden (it must be one safe path segment)."""


def check_golden_id(golden_id: str) -> str:
    """``golden_id`` itself, or :class:`GoldenIdError` saying what an id may be."""
    if not GOLDEN_ID.fullmatch(golden_id):
        raise GoldenIdError(f"golden id {golden_id!r} is not a part reference: use 1-128 letters, digits, "
                            "'.', '_' or '-', starting with a letter or digit")
    return golden_id


@dataclass(frozen=True)
class Golden:
    """A registered golden: its id, the version in force and what it holds."""

    id: str
    version: str
    lights: tuple[str, ...]  # the lighting order of every shot's images
    shots: int  # a golden set: the test is scored against each shot, the nearest decides
    created: str  # UTC, ISO 8601

    def describe(self) -> dict:
        """The JSON answer that names this golden."""
        return {"golden_id": self.id, "shots": self.shots, "lights": list(self.lights),
                "created": self.created}


class GoldenStore:
    """The goldens under one folder or URI."""

    def __init__(self, location: str) -> None:
        if "://" not in location:
            location = str(Path(location).expanduser().resolve())
        try:
            self.filesystem, self.root = pafs.FileSystem.from_uri(location)
        except (OSError, ValueError) as error:
            raise DataError(f"serve.golden_store={location!r} cannot be opened: {error}") from None
        self.location = location
        self.filesystem.create_dir(self.root, recursive=True)

    def put(self, golden_id: str, lights: tuple[str, ...], shots: list[tuple[bytes, ...]]) -> Golden:
        """Register ``shots`` (each a shot's encoded images in ``lights`` order) as ``golden_id``,
        replacing what it was; the images are already checked (decodable, the model's size)."""
        check_golden_id(golden_id)
        previous = self.get(golden_id)
        version = f"{time.time_ns():x}-{secrets.token_hex(4)}"
        folder = self._path(golden_id, version)
        self.filesystem.create_dir(folder, recursive=True)
        for shot, images in enumerate(shots):
            for light, data in enumerate(images):
                self._write(f"{folder}/{shot}.{light}.img", data)
        golden = Golden(golden_id, version, tuple(lights), len(shots),
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self._write(self._path(golden_id, MANIFEST), json.dumps(asdict(golden)).encode())  # now visible
        if previous is not None and previous.version != version:
            self._remove(self._path(golden_id, previous.version))
        return golden

    def get(self, golden_id: str) -> Golden | None:
        """The golden registered as ``golden_id``, or None."""
        check_golden_id(golden_id)
        try:
            with self.filesystem.open_input_stream(self._path(golden_id, MANIFEST)) as stream:
                fields = json.loads(stream.read())
        except FileNotFoundError:
            return None
        return Golden(**{**fields, "lights": tuple(fields["lights"])})

    def images(self, golden: Golden) -> list[tuple[bytes, ...]]:
        """Every shot's encoded images, in the golden's lighting order."""
        folder = self._path(golden.id, golden.version)
        return [tuple(self._read(f"{folder}/{shot}.{light}.img") for light in range(len(golden.lights)))
                for shot in range(golden.shots)]

    def ids(self, after: str | None = None, limit: int = 100) -> list[str]:
        """Registered ids in sorted order, the first ``limit`` after ``after`` (a page)."""
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        names = sorted(info.base_name for info in self.filesystem.get_file_info(selector)
                       if info.type == pafs.FileType.Directory and GOLDEN_ID.fullmatch(info.base_name))
        page = []
        for name in names:
            if len(page) == limit:
                break
            if (after is None or name > after) and self._exists(self._path(name, MANIFEST)):
                page.append(name)  # a folder without a manifest is an upload in progress, or leftovers
        return page

    def delete(self, golden_id: str) -> bool:
        """Unregister ``golden_id`` (its manifest first: it is gone at once); False if unknown."""
        golden = self.get(golden_id)
        if golden is None:
            return False
        self.filesystem.delete_file(self._path(golden_id, MANIFEST))
        self._remove(self._path(golden_id, ""))
        return True

    def features(self, golden: Golden, model_sha256: str) -> np.ndarray | None:
        """The features ``model_sha256`` computed of every shot, if they were kept."""
        try:
            return np.load(io.BytesIO(self._read(self._features_path(golden, model_sha256))))
        except FileNotFoundError:
            return None

    def keep_features(self, golden: Golden, model_sha256: str, features: np.ndarray) -> None:
        """Keep ``features`` (every shot's, as the model computed them) beside the images."""
        buffer = io.BytesIO()
        np.save(buffer, features)
        self._write(self._features_path(golden, model_sha256), buffer.getvalue())

    def keep_stats(self, golden_id: str, replica: str, stats: dict) -> None:
        """Replace ``replica``'s statistics of the pairs scored against ``golden_id``."""
        self.filesystem.create_dir(self._path(golden_id, "stats"), recursive=True)
        self._write(self._path(golden_id, f"stats/{replica}.json"), json.dumps(stats).encode())

    def stats(self, golden_id: str) -> list[dict]:
        """Every replica's statistics of ``golden_id`` (what :meth:`keep_stats` wrote)."""
        selector = pafs.FileSelector(self._path(golden_id, "stats"), allow_not_found=True)
        return [json.loads(self._read(info.path)) for info in self.filesystem.get_file_info(selector)
                if info.type == pafs.FileType.File and info.base_name.endswith(".json")]

    def _features_path(self, golden: Golden, model_sha256: str) -> str:
        return self._path(golden.id, f"{golden.version}/{model_sha256}.npy")

    def _path(self, golden_id: str, name: str) -> str:
        return f"{self.root}/{golden_id}/{name}".rstrip("/")

    def _read(self, path: str) -> bytes:
        with self.filesystem.open_input_stream(path) as stream:
            return stream.read()

    def _exists(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type == pafs.FileType.File

    def _write(self, path: str, data: bytes) -> None:
        """Write ``path`` whole or not at all: a temp name beside it, then one move onto it."""
        temporary = f"{path}.{secrets.token_hex(6)}.tmp"
        with self.filesystem.open_output_stream(temporary) as stream:
            stream.write(data)
        self.filesystem.move(temporary, path)

    def _remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filesystem.delete_dir(path)
