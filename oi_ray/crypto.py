"""Authenticated encryption at rest for checkpoints and exported models (``encryption_key``).

With a key, files are ``MAGIC | salt | nonce | AES-256-GCM(payload)``; the AES key is
derived from the spec's ``encryption_key`` with scrypt and a per-file salt, and GCM's tag
makes any wrong key or modified byte fail loudly. Without a key, files stay plain and
readable by standard tools (torch, onnx, Netron).
"""

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from oi_ray.errors import DataError

MAGIC = b"OI-RAY-ENCRYPTED-1\n"
SALT_BYTES = 16
NONCE_BYTES = 12
SCRYPT_COST = 2**14  # ~20 ms per file on a laptop; the key is a passphrase, so not trivial


def protect(payload: bytes, key: str | None) -> bytes:
    """``payload`` encrypted with ``key``, or unchanged when there is no key."""
    if not key:
        return payload
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    return MAGIC + salt + nonce + AESGCM(_derive(key, salt)).encrypt(nonce, payload, MAGIC)


def is_encrypted(data: bytes) -> bool:
    """Whether ``data`` was written by :func:`protect` with a key."""
    return data.startswith(MAGIC)


def unprotect(data: bytes, key: str | None, source: str | Path) -> bytes:
    """The plain bytes of a file read from ``source``; plain files pass through."""
    if not is_encrypted(data):
        return data
    if not key:
        raise DataError(f"{source} is encrypted: set encryption_key in the spec (or as an override)")
    header = len(MAGIC)
    salt = data[header:header + SALT_BYTES]
    nonce = data[header + SALT_BYTES:header + SALT_BYTES + NONCE_BYTES]
    try:
        return AESGCM(_derive(key, salt)).decrypt(nonce, data[header + SALT_BYTES + NONCE_BYTES:], MAGIC)
    except InvalidTag:
        raise DataError(f"cannot decrypt {source}: wrong encryption_key, or the file was modified") from None


def _derive(key: str, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=SCRYPT_COST, r=8, p=1).derive(key.encode("utf-8"))
