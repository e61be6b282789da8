"""Shared fixtures: one local Ray session per test module that asks for it."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py


@pytest.fixture(scope="module")
def ray_local():
    """A small embedded Ray (4 logical CPUs, 512 MiB object store), shut down afterwards."""
    from oi_ray.config.schema import RayConfig
    from oi_ray.runtime import ray_session

    with ray_session(RayConfig(num_cpus=4, object_store_memory_mb=512)):
        yield
