"""Authenticated encryption at rest for checkpoints and exported models (``encryption_key``).

With a key, files are ``MAGIC | salt | nonce | AES-256-GCM ciphertext | 16-byte tag`` (MAGIC
is the associated data); the AES key is derived from the spec's ``encryption_key`` with
scrypt and a per-file salt, and GCM's tag makes any wrong key or modified byte fail loudly.
Without a key, files stay plain and readable by standard tools (torch, onnx, Netron).

Both directions stream: encryption goes through a file-like writer in chunks, decryption
reads the file in chunks, so neither holds the ciphertext in memory. Decrypted content is
used only after the tag has been checked.
"""

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from oi_ray.errors import DataError

MAGIC = b"OI-RAY-ENCRYPTED-1\n"
SALT_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + SALT_BYTES + NONCE_BYTES
SCRYPT_COST = 2**14  # ~20 ms per file on a laptop; the key is a passphrase, so not trivial
CHUNK_BYTES = 4 << 20  # what one encrypt/decrypt call holds beside the caller's data


class EncryptingWriter:
    """A write-only file object: what is written reaches ``out`` encrypted with ``key``.

    The header goes out at once; :meth:`finish` appends GCM's tag and must be called after
    the last write (:func:`protected_output` does it).
    """

    def __init__(self, out: BinaryIO, key: str) -> None:
        salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
        self._out = out
        self._encryptor = Cipher(algorithms.AES(_derive(key, salt)), modes.GCM(nonce)).encryptor()
        self._encryptor.authenticate_additional_data(MAGIC)
        out.write(MAGIC + salt + nonce)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK_BYTES):
            self._out.write(self._encryptor.update(view[start:start + CHUNK_BYTES]))
        return len(view)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self._out.flush()

    def finish(self) -> None:
        self._out.write(self._encryptor.finalize() + self._encryptor.tag)


@contextmanager
def protected_output(out: BinaryIO, key: str | None) -> Iterator[BinaryIO | EncryptingWriter]:
    """``out`` itself without a key; with one, a writer that encrypts into ``out``."""
    if not key:
        yield out
        return
    writer = EncryptingWriter(out, key)
    yield writer
    writer.finish()


def is_encrypted_file(path: str | Path) -> bool:
    """Whether the file at ``path`` was written with a key."""
    with open(path, "rb") as file:
        return file.read(len(MAGIC)) == MAGIC


def decrypt_into(path: str | Path, key: str | None, out: BinaryIO | None) -> None:
    """Stream the plain content of the encrypted file at ``path`` into ``out`` and check its
    tag (``out=None`` only authenticates: right key, unmodified file). Raises ``DataError``
    for a missing or wrong key or a modified file; ``out`` then holds unauthenticated bytes."""
    if not key:
        raise DataError(f"{path} is encrypted: set encryption_key in the spec (or as an override)")
    size = os.path.getsize(path)
    if size < HEADER_BYTES + TAG_BYTES:
        raise DataError(f"cannot decrypt {path}: the file is truncated")
    with open(path, "rb") as file:
        header = file.read(HEADER_BYTES)
        salt, nonce = header[len(MAGIC):len(MAGIC) + SALT_BYTES], header[len(MAGIC) + SALT_BYTES:]
        file.seek(size - TAG_BYTES)
        tag = file.read(TAG_BYTES)
        file.seek(HEADER_BYTES)
        decryptor = Cipher(algorithms.AES(_derive(key, salt)), modes.GCM(nonce, tag)).decryptor()
        decryptor.authenticate_additional_data(MAGIC)
        remaining = size - HEADER_BYTES - TAG_BYTES
        while remaining > 0:
            chunk = file.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            plain = decryptor.update(chunk)
            if out is not None:
                out.write(plain)
        try:
            decryptor.finalize()
        except InvalidTag:
            raise DataError(f"cannot decrypt {path}: wrong encryption_key, or the file was modified") \
                from None


def read_plain(path: str | Path, key: str | None) -> bytes:
    """The plain bytes of the file at ``path``, decrypted and authenticated when encrypted."""
    if not is_encrypted_file(path):
        return Path(path).read_bytes()
    buffer = io.BytesIO()
    decrypt_into(path, key, buffer)
    return buffer.getvalue()  # shares the buffer: one copy of the plain bytes


@contextmanager
def plain_source(path: Path, key: str | None) -> Iterator[Path | io.BytesIO]:
    """Something ``torch.load`` reads as the plain content of ``path``: ``path`` itself when it
    is plain; for an encrypted file, its decrypted and authenticated bytes held once in memory,
    as an anonymous in-memory file (Linux memfd, readable and mappable by path, so tensors
    loaded with ``mmap=True`` share its pages) or, where there is none, a ``BytesIO``."""
    if not is_encrypted_file(path):
        yield path
        return
    if not hasattr(os, "memfd_create") or not Path("/proc/self/fd").is_dir():
        buffer = io.BytesIO()
        decrypt_into(path, key, buffer)
        buffer.seek(0)
        yield buffer
        return
    descriptor = os.memfd_create(f"oi-ray-{path.name}", os.MFD_CLOEXEC)
    try:
        with open(descriptor, "wb", closefd=False) as memory:
            decrypt_into(path, key, memory)
        yield Path(f"/proc/self/fd/{descriptor}")  # mappings made from it outlive the descriptor
    finally:
        os.close(descriptor)


def _derive(key: str, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=SCRYPT_COST, r=8, p=1).derive(key.encode("utf-8"))
