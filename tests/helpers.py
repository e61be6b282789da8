"""Small hand-made TAO-layout datasets for tests that need exact control over files, a model
file opened as a spec expects it, and running a command until Ctrl-C."""

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from oi_ray.config.schema import ExperimentConfig
from oi_ray.model.registry import Architecture
from oi_ray.model_card import ModelCard
from oi_ray.model_file import ModelFile, open_model_file

LIGHTS = ("LowAngleLight", "SolderLight")
# TAO's published example specs, verbatim (TAO's documented fields and values, placeholder paths).
TAO_SPECS = Path(__file__).resolve().parent / "tao_specs"


def tao_architecture(model_type: str, input_shape: tuple[int, int, int],
                     embedding_dim: int = 5) -> Architecture:
    """One of TAO's models (their layers do not depend on the lighting tiles)."""
    return Architecture(model_type, input_shape, (1, 1), embedding_dim)


def spec_model(path: Path, config: ExperimentConfig) -> ModelFile:
    """The model file at ``path``, checked as ``evaluate`` with ``config`` checks it."""
    return open_model_file(path, config.encryption_key, ModelCard.expected_by(config))


def write_pair_dataset(
    root: Path,
    rows: list[tuple[str, str, str, str]],
    lights: tuple[str, ...] = LIGHTS,
    size: tuple[int, int] = (8, 6),
    image_ext: str = ".png",
    csv_name: str = "pairs.csv",
) -> Path:
    """Write images for ``rows`` of (input_path, golden_path, object_name, label) and a CSV.

    Each image is filled with a value derived from its path, so tests can tell images apart.
    Returns the CSV path; images live under ``root / "images"``.
    """
    images = root / "images"
    for input_path, golden_path, object_name, _ in rows:
        for folder in (input_path, golden_path):
            for light in lights or ("",):
                suffix = f"_{light}" if light else ""
                path = images / folder / f"{object_name}{suffix}{image_ext}"
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    value = sum(map(ord, str(path.relative_to(images)))) % 256
                    pixels = np.full((size[1], size[0], 3), value, dtype=np.uint8)
                    Image.fromarray(pixels).save(path)
    csv_path = root / csv_name
    lines = ["input_path,golden_path,object_name,label", *(",".join(row) for row in rows)]
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


def _default_sigint() -> None:
    """In a child before it runs its command: a Python child installs its KeyboardInterrupt
    handler only where SIGINT is not ignored at its start."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_interruptible(command: list[str], **popen: Any) -> subprocess.Popen:
    """Start ``command`` in a process group of its own that the test can Ctrl-C
    (``os.killpg(process.pid, signal.SIGINT)``), with SIGINT's default handling even where this
    process ignores it (a job in the background of a CI script), as a shell in a terminal gives it."""
    return subprocess.Popen(command, start_new_session=True, preexec_fn=_default_sigint, **popen)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group a test started (``start_interruptible``, or ``start_new_session``),
    if its leader still runs: what a failed test started does not outlive it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def ctrl_c_once_logged(command: list[str], log: Path, marker: str, timeout_s: float = 300.0,
                       answer: str | None = None) -> str:
    """Run ``command`` in a process group of its own (output to ``log``) until ``marker`` shows
    in its output, send the group SIGINT, as a terminal's Ctrl-C does, and return the output
    once it exited with 130 (started by ``start_interruptible``). With ``answer``, its standard
    input is a terminal (a pseudo-terminal) and ``answer`` is typed there once the command asks
    its question (a line ending in "] "). The group is killed if anything goes wrong."""
    terminal, typing = os.openpty() if answer is not None else (None, None)
    with log.open("w") as output:
        process = start_interruptible(command, stdout=output, stderr=subprocess.STDOUT,
                                      stdin=typing if typing is not None else subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while marker not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        os.killpg(process.pid, signal.SIGINT)
        if terminal is not None:
            while not log.read_text().rstrip(" ").endswith("]"):
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            os.write(terminal, f"{answer}\n".encode())
        assert process.wait(timeout=120) == 130, log.read_text()
    finally:
        kill_group(process)
        for descriptor in (terminal, typing):
            if descriptor is not None:
                os.close(descriptor)
    return log.read_text()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_serving(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    """Wait until the `oi-ray serve` ``process`` logging into ``log`` has started (its banner
    says how to stop it) and answers ``GET {url}/healthz`` with 200."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, f"the service exited: {log.read_text()}"
        if "Press Ctrl-C to stop." in log.read_text():
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
        assert time.monotonic() < deadline, f"not serving within {timeout_s} s: {log.read_text()}"
        time.sleep(1)
