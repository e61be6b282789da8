"""Shared fixtures: one local Ray session per test module that asks for it."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

# pyproject's timeout (120 s) ends a hung test; a test marked slow (an end-to-end run that takes
# minutes on two cores, its module's shared set-up included) gets this one instead
SLOW_TEST_TIMEOUT_S = 600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests get SLOW_TEST_TIMEOUT_S unless they name a timeout of their own."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_S))


@pytest.fixture(scope="module")
def ray_local():
    """A small embedded Ray (4 logical CPUs, 512 MiB object store), shut down afterwards."""
    from oi_ray.config.schema import RayConfig
    from oi_ray.runtime import ray_session

    with ray_session(RayConfig(num_cpus=4, object_store_memory_mb=512)):
        yield
