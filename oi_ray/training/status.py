"""``status.json`` in a training results folder: one JSON line of metrics per epoch (TAO's KPI log)."""

import json
import time
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"


def append_status(results_dir: Path, metrics: dict[str, Any]) -> None:
    """Append one epoch's line, stamped with the local time, in a single write."""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **metrics}) + "\n"
    with open(results_dir / STATUS_FILE, "a", encoding="utf-8") as status:
        status.write(line)


def status_lines(results_dir: Path) -> list[dict[str, Any]]:
    """Every epoch's metrics in ``results_dir``'s status file, oldest first (none: no file)."""
    path = results_dir / STATUS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def copy_status(source_dir: Path, destination_dir: Path, last_epoch: int) -> None:
    """Write ``source_dir``'s lines of epochs up to ``last_epoch`` as ``destination_dir``'s status
    file (nothing when ``source_dir`` has none)."""
    lines = [line for line in status_lines(source_dir) if line["epoch"] <= last_epoch]
    if lines:
        (destination_dir / STATUS_FILE).write_text("".join(f"{json.dumps(line)}\n" for line in lines),
                                                   encoding="utf-8")
