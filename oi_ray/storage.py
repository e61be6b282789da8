"""Every path may be a URI: one filesystem layer over pyarrow's filesystems.

A location is a plain local path (as always), a ``file://`` URI, or a URI that
``pyarrow.fs.FileSystem.from_uri`` opens (``s3://bucket/key``, ``gs://``, ``abfs://``, ...).
Credentials come from where each store's own client looks (the environment, instance roles,
``~/.aws``); an S3-compatible store (MinIO, Ceph) is reached through ``AWS_ENDPOINT_URL``,
which ``from_uri`` honours. One filesystem is opened per store (scheme and bucket) and
process, and reused.

Local locations keep the local code paths (``open``, ``os.listdir``, renames with fsync);
URIs go through pyarrow. Reading is by whole objects, listing by folder (one request per
page of names, not one per file), and :func:`atomic_output` never leaves a half-written
object under the final name (an object store completes even an interrupted upload, so the
bytes go to a temporary key first and are moved when complete).
"""

import contextlib
import functools
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from oi_ray.errors import DataError
from oi_ray.fileio import atomic_output as local_atomic_output
from oi_ray.fileio import remove_partial_files as local_remove_partial_files

FILE_SCHEME = "file://"
COPY_CHUNK_BYTES = 8 * 2**20
# How long an S3 request may pass no bytes before it is retried. The AWS SDK's 3 s is shorter
# than a store takes to answer a server-side copy of a large checkpoint (moto: ~10 s for 2 GB)
# or a slow part upload; 60 s is boto3's read timeout.
S3_REQUEST_TIMEOUT_S = 60.0


def is_uri(location: str) -> bool:
    """Whether ``location`` names a remote store (``s3://``, ``gs://``, ...), not a local path."""
    return "://" in location and not location.startswith(FILE_SCHEME)


def local_path(location: str) -> str:
    """A local location as a plain path (``file://`` stripped, ``~`` expanded)."""
    if location.startswith(FILE_SCHEME):
        location = urlsplit(location).path
    return os.path.expanduser(location)


def join(location: str, *parts: str) -> str:
    """``location`` with ``parts`` appended (``/`` in URIs, ``os.path.join`` locally)."""
    if not is_uri(location):
        return os.path.join(local_path(location), *parts)
    return "/".join([location.rstrip("/"), *(part.strip("/") for part in parts)])


def absolute(location: str) -> str:
    """``location`` as oi-ray names it in logs and files: a local path made absolute, a URI as it is."""
    return location.rstrip("/") if is_uri(location) else str(Path(local_path(location)).resolve())


def output_folder(location: str) -> str:
    """A results folder made ready for writing: a local one made (and named absolutely), a URI
    as it is (a bucket has no folders to make)."""
    folder = absolute(location)
    if not is_uri(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
    return folder


def parent(location: str) -> str:
    """The folder holding ``location``."""
    if not is_uri(location):
        return os.path.dirname(local_path(location))
    return location.rstrip("/").rsplit("/", 1)[0]


def name(location: str) -> str:
    """The last segment of ``location``: a file's name."""
    return location.rstrip("/").rsplit("/", 1)[-1] if is_uri(location) else os.path.basename(location)


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds ``location`` and the path inside it (``bucket/key`` in a bucket)."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(location))
    parts = urlsplit(location)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") if parts.scheme == "s3" else None
    bucket = parts.netloc.rsplit("@", 1)[-1]  # s3://anonymous@bucket/...: unsigned requests
    return _store(parts.scheme, parts.netloc, endpoint), f"{bucket}{parts.path}".rstrip("/")


@functools.cache
def _store(scheme: str, bucket: str, endpoint: str | None) -> pafs.FileSystem:
    """One filesystem per store (and S3 endpoint) and process: opening one costs a client,
    credentials and a region lookup. ``from_uri`` reads ``endpoint`` from the environment; an
    S3 filesystem is then remade with the options it chose and :data:`S3_REQUEST_TIMEOUT_S`
    (``from_uri`` takes no timeout)."""
    try:
        filesystem = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]
    except (OSError, ValueError) as error:
        raise DataError(f"cannot open {scheme}://{bucket}: {error}") from None
    if isinstance(filesystem, pafs.S3FileSystem):
        remake, (options,) = filesystem.__reduce__()  # every option, as pickling carries them
        filesystem = remake({**options, "request_timeout": S3_REQUEST_TIMEOUT_S})
    return filesystem


def _store_error(location: str, error: OSError) -> DataError:
    """One clear line for a failed request: a missing bucket, denied credentials, no network."""
    return DataError(f"cannot reach {location}: {str(error).splitlines()[0]}")


def read_bytes(location: str) -> bytes:
    """The whole file or object at ``location``."""
    if not is_uri(location):
        with open(local_path(location), "rb") as file:
            return file.read()
    filesystem, path = resolve(location)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise
    except OSError as error:
        raise _store_error(location, error) from None


def file_size(location: str) -> int | None:
    """The size of the file at ``location`` in bytes, or None when there is none."""
    filesystem, path = resolve(location)
    try:
        info = filesystem.get_file_info(path)
    except OSError as error:
        raise _store_error(location, error) from None
    return info.size if info.type == pafs.FileType.File else None


def is_folder(location: str) -> bool:
    """Whether ``location`` is a folder (locally) or a prefix holding objects (in a store)."""
    if not is_uri(location):
        return os.path.isdir(local_path(location))
    filesystem, path = resolve(location)
    try:
        return filesystem.get_file_info(path).type == pafs.FileType.Directory
    except OSError as error:
        raise _store_error(location, error) from None


def list_files(folder: str) -> dict[str, int]:
    """The files directly in ``folder`` and their sizes (empty when there is no such folder).

    One listing (a request per 1,000 names in object stores), not one request per file."""
    if not is_uri(folder):
        try:
            with os.scandir(local_path(folder)) as entries:
                return {entry.name: entry.stat().st_size for entry in entries if entry.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            return {}
    filesystem, path = resolve(folder)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as error:
        raise _store_error(folder, error) from None
    return {info.base_name: info.size for info in infos if info.type == pafs.FileType.File}


def list_tree(folder: str) -> dict[str, dict[str, int]]:
    """Every file under the bucket folder ``folder``, at any depth, by the folder holding it
    (``{folder URI: {name: size}}``): one flat listing, a request per 1,000 files, however
    many folders they sit in."""
    filesystem, path = resolve(folder)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as error:
        raise _store_error(folder, error) from None
    tree: dict[str, dict[str, int]] = {}
    for info in infos:
        if info.type == pafs.FileType.File:  # named under ``folder`` as given (s3://anonymous@... too)
            within = info.path[len(path):].strip("/")
            holder = join(folder, within.rsplit("/", 1)[0]) if "/" in within else folder.rstrip("/")
            tree.setdefault(holder, {})[info.base_name] = info.size
    return tree


def check_store(location: str, key: str) -> None:
    """A missing bucket or credentials the store refuses, said once for the spec ``key``."""
    if not is_uri(location):
        return
    filesystem, path = resolve(location)
    bucket = path.split("/", 1)[0]
    try:
        found = filesystem.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as error:
        raise DataError(f"{key}={location}: {str(error).splitlines()[0]}") from None
    if not found:
        raise DataError(f"{key}={location}: the bucket {bucket!r} does not exist (or these credentials "
                        "cannot see it)")


@contextlib.contextmanager
def atomic_output(location: str) -> Iterator[BinaryIO]:
    """A writable stream whose bytes appear at ``location`` all at once when the ``with`` block
    ends normally, and never when it raises: readers see the old file or the new one whole.

    Locally a temp file renamed into place; in a store a temporary object beside it, moved
    (copied server-side) onto ``location`` once complete."""
    if not is_uri(location):
        target = Path(local_path(location))
        target.parent.mkdir(parents=True, exist_ok=True)
        with local_atomic_output(target) as out:
            yield out
        return
    filesystem, path = resolve(location)
    with _object_moved_into_place(filesystem, path, location) as temporary, \
            filesystem.open_output_stream(temporary) as out:
        yield out


@contextlib.contextmanager
def _object_moved_into_place(filesystem: pafs.FileSystem, path: str, location: str) -> Iterator[str]:
    """A temporary key beside ``path`` (in ``filesystem``; ``location`` names it in errors) for
    the block to fill: moved onto ``path`` when the block ends normally, deleted when it raises."""
    folder, final = path.rsplit("/", 1)
    temporary = f"{folder}/.{final}.{secrets.token_hex(6)}.tmp"
    try:
        yield temporary
        try:
            filesystem.move(temporary, path)
        except OSError as error:
            raise _store_error(location, error) from None
    except BaseException:
        with contextlib.suppress(OSError):
            filesystem.delete_file(temporary)
        raise


def write_atomically(location: str, payload: bytes) -> None:
    """Write ``payload`` so readers see the old file or the complete new one (see :func:`atomic_output`)."""
    with atomic_output(location) as out:
        out.write(payload)


def upload(path: Path, location: str) -> None:
    """Copy the local file ``path`` to ``location`` (see :func:`atomic_output`), streaming."""
    with atomic_output(location) as out, open(path, "rb") as local:
        shutil.copyfileobj(local, out, COPY_CHUNK_BYTES)


def copy_in_store(source: str, destination: str) -> None:
    """Copy the object ``source`` onto ``destination`` in the same store, server-side and
    atomically (a temporary object, then moved): how a bucket holds ``oi_model_latest.pth``,
    having no links."""
    filesystem, source_path = resolve(source)
    _, path = resolve(destination)
    with _object_moved_into_place(filesystem, path, destination) as temporary:
        try:
            filesystem.copy_file(source_path, temporary)
        except OSError as error:
            raise _store_error(destination, error) from None


def remove_partial_files(folder: str) -> list[str]:
    """Delete the temporary files (``.*.tmp``) that writers killed mid-write left in ``folder``."""
    if not is_uri(folder):
        return [str(path) for path in local_remove_partial_files(local_path(folder))]
    filesystem, path = resolve(folder)
    leftovers = sorted(name for name in list_files(folder) if name.startswith(".") and name.endswith(".tmp"))
    for leftover in leftovers:
        with contextlib.suppress(FileNotFoundError):
            filesystem.delete_file(f"{path}/{leftover}")
    return [join(folder, leftover) for leftover in leftovers]


def cached_copy(location: str, cache_root: str | None = None) -> Path:
    """A local copy of the file at ``location`` and of its sidecars (the files beside it whose
    names start with its stem: a model's card and halves), fetched once and again only when a
    listing shows another size or time; a local ``location`` is returned as it is.

    ``cache_root``: ``$OI_RAY_CACHE_DIR``, else ``~/.cache/oi-ray``."""
    if not is_uri(location):
        return Path(local_path(location))
    folder, wanted = parent(location), name(location)
    stem = wanted.split(".", 1)[0]
    filesystem, path = resolve(folder)
    try:
        infos = [info for info in filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                 if info.type == pafs.FileType.File and info.base_name.startswith(f"{stem}.")]
    except OSError as error:
        raise _store_error(location, error) from None
    if wanted not in {info.base_name for info in infos}:
        raise DataError(f"not found: {location}")
    root = Path(cache_root or os.environ.get("OI_RAY_CACHE_DIR") or Path.home() / ".cache" / "oi-ray")
    copy = root / "files" / hashlib.sha256(folder.encode()).hexdigest()[:24]
    copy.mkdir(parents=True, exist_ok=True)
    for info in infos:
        stamp = copy / f".{info.base_name}.source"
        source = f"{info.size} {info.mtime_ns}"
        if (copy / info.base_name).is_file() and stamp.is_file() and stamp.read_text() == source:
            continue
        try:
            with local_atomic_output(copy / info.base_name) as out, \
                    filesystem.open_input_stream(info.path) as stream:
                while chunk := stream.read(COPY_CHUNK_BYTES):
                    out.write(chunk)
        except OSError as error:
            raise _store_error(join(folder, info.base_name), error) from None
        write_atomically(str(stamp), source.encode())
    return copy / wanted
