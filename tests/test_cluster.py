"""Which Ray a command uses: private embedded Ray, or a cluster that answers, or one clear error."""

import os
import socket
import time

import pytest

from oi_ray.config.schema import RayConfig
from oi_ray.errors import ConfigError
from oi_ray.runtime import ray_session


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_address_nobody_answers_is_one_clear_error_at_once(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"ray.address=127.0.0.1:{port}: no Ray cluster answers at \S+:{port}$"), \
            ray_session(RayConfig(address=f"127.0.0.1:{port}")):
        pass
    assert time.monotonic() - start < 30  # Ray itself retries for minutes
    assert "RAY_AUTH_MODE" not in os.environ  # never switched off for a cluster oi-ray did not start


def test_a_job_server_address_is_not_a_ray_address():
    with pytest.raises(ConfigError, match="is a dashboard / job server address: give it as --address"), \
            ray_session(RayConfig(address="http://127.0.0.1:8265")):
        pass
