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
