"""Writing files so that nothing half-written is ever seen."""

import os
import secrets
from pathlib import Path


def write_atomically(path: Path, payload: bytes) -> None:
    """Write bytes so readers see the old file or the complete new one, never a partial one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as out:  # unlike mkstemp, honours the umask (0644 files)
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
