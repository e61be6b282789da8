"""Command lines oi-ray prints for the user to run next, spelled so they work in their shell."""

import shlex
import shutil
import sys
from pathlib import Path

PROGRAM = "oi-ray"


def program() -> str:
    """How to invoke oi-ray from the user's shell.

    ``oi-ray`` when that name on ``PATH`` runs this installation; otherwise the path this
    process was started with (``.venv/bin/oi-ray`` when the venv is not activated), or
    ``python -m oi_ray.cli`` with this interpreter when oi-ray was not started by its script.
    """
    on_path = shutil.which(PROGRAM)
    started = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if started is not None and started.name == PROGRAM:
        if on_path and Path(on_path).resolve() == started.resolve():
            return PROGRAM
        return shlex.quote(str(started))
    if on_path and Path(on_path).resolve().parent == Path(sys.executable).parent.resolve():
        return PROGRAM
    return f"{shlex.quote(sys.executable)} -m oi_ray.cli"


def command(task: str, *arguments: object) -> str:
    """A printable ``oi-ray <task> ...`` line with the working program name, each argument
    quoted for the shell where it needs it (a path with spaces stays one argument)."""
    return " ".join([program(), task, *(shlex.quote(str(argument)) for argument in arguments)])
