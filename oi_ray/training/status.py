"""``status.json`` in a training results folder: one JSON line of metrics per epoch (TAO's KPI log)."""

import json
import time
from pathlib import Path
from typing import Any

from oi_ray import storage

STATUS_FILE = "status.json"


def append_status(results_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Append one epoch's line, stamped with the local time: locally in a single write, in a
    bucket (whose objects cannot be appended to) by rewriting the whole file atomically."""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **metrics}) + "\n"
    path = storage.join(str(results_dir), STATUS_FILE)
    if not storage.is_uri(path):
        with open(path, "a", encoding="utf-8") as status:
            status.write(line)
        return
    earlier = storage.read_bytes(path) if storage.file_size(path) is not None else b""
    storage.write_atomically(path, earlier + line.encode())


def status_lines(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every epoch's metrics in ``results_dir``'s status file, oldest first (none: no file)."""
    path = storage.join(str(results_dir), STATUS_FILE)
    if storage.file_size(path) is None:
        return []
    text = storage.read_bytes(path).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def copy_status(source_dir: Path, destination_dir: Path, last_epoch: int) -> None:
    """Write ``source_dir``'s lines of epochs up to ``last_epoch`` as ``destination_dir``'s status
    file (nothing when ``source_dir`` has none)."""
    lines = [line for line in status_lines(source_dir) if line["epoch"] <= last_epoch]
    if lines:
        (destination_dir / STATUS_FILE).write_text("".join(f"{json.dumps(line)}\n" for line in lines),
                                                   encoding="utf-8")
