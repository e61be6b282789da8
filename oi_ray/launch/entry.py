"""What a Ray Job submitted by oi-ray runs on the cluster: the same ``oi-ray`` command line, on
the spec that travelled with the job in the ``OI_RAY_JOB_SPEC`` environment variable.

    python -m oi_ray.launch.entry <task> [task options]
"""

import os
import sys
import tempfile
from pathlib import Path

from oi_ray.cli import main as oi_ray
from oi_ray.launch.jobs import SPEC_VARIABLE


def main(argv: list[str]) -> int:
    """Run ``oi-ray <task> -e <the job's spec> [task options]``; its exit status."""
    task, *options = argv
    spec_text = os.environ.get(SPEC_VARIABLE)
    if spec_text is None:
        print(f"oi-ray {task}: error: {SPEC_VARIABLE} is not set; this entry runs inside a job that "
              f"oi-ray submitted", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="oi-ray-job-") as folder:
        spec = Path(folder) / "spec.yaml"
        spec.write_text(spec_text)
        return oi_ray([task, "-e", str(spec), *options])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
