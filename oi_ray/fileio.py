"""Writing files so that nothing half-written is ever seen."""

import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """The open temp file beside ``path``: written in the ``with`` block, renamed onto ``path``
    when the block ends normally, removed when it raises. Readers see the old file or the
    complete new one, never a partial one, and the payload streams to disk as it is written.
    ``file.name`` is the temp file's path, readable before the rename (e.g. to verify it)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as out:  # unlike mkstemp, honours the umask (0644 files)
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomically(path: Path, payload: bytes) -> None:
    """Write bytes so readers see the old file or the complete new one, never a partial one."""
    with atomic_output(path) as out:
        out.write(payload)


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of the file at ``path`` (hex), read in chunks: nothing held in memory."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def remove_partial_files(folder: str | Path) -> list[Path]:
    """Delete the temp files that writers in ``folder`` left when they were killed mid-write."""
    leftovers = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers
