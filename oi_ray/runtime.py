"""Starting or joining Ray, in one place, with defaults that suit small machines."""

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import ray
import ray.data

from oi_ray.config.schema import RayConfig
from oi_ray.errors import ConfigError
from oi_ray.ray_internals import bootstrap_address, metrics_export_port

log = logging.getLogger(__name__)

MIN_LOCAL_CPUS = 4  # logical CPUs, so Ray Data has room next to two training workers
# Only for a Ray that oi-ray starts itself, single-user on loopback: a cluster oi-ray joins keeps
# its own token authentication (the user's RAY_AUTH_MODE / RAY_AUTH_TOKEN apply).
EMBEDDED_RAY_ENV = {"RAY_AUTH_MODE": "disabled"}
RAY_ENV_DEFAULTS = {"RAY_DEDUP_LOGS": "1"}
# glibc's malloc gives every freed block over 32 MiB back to the kernel and maps fresh, zeroed
# pages for the next one, and a thread other than the main one gets its blocks over 64 MiB that
# way whatever the threshold: a CPU training step, whose activations are such blocks, spent as
# long faulting pages in as computing (benchmarks/RESULTS.md, "CPU memory allocator"). Ray's
# workers keep freed memory for reuse (a worker's resident memory stays at its peak) and every
# thread allocates from the main heap. Only glibc reads these; a value set in the driver's
# environment (the shell, or ray.runtime_env.env_vars for a Ray job) is left as it is.
WORKER_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**31 - 1), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
                        "MALLOC_ARENA_MAX": "1"}
CONNECT_TIMEOUT_S = 5.0


@contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """Run the body with Ray available: join ``config.address`` or start an embedded Ray.

    A Ray started here is shut down on exit; an already initialised Ray is reused as is.
    """
    if ray.is_initialized():
        yield
        return
    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if config.address:
        _join(config.address)
    else:
        for name, value in EMBEDDED_RAY_ENV.items():
            os.environ.setdefault(name, value)
        num_cpus = config.num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
        memory = config.object_store_memory_mb
        ray.init(
            address="local",  # a private Ray, even when another one runs on this machine
            num_cpus=num_cpus,
            object_store_memory=memory * 1024 * 1024 if memory else None,
            include_dashboard=config.include_dashboard,
            dashboard_host="127.0.0.1",
            **metrics_export_port(config.metrics_export_port),
            logging_level=logging.WARNING,
            # Workers' output stays in Ray's log files; the driver draws progress and summaries.
            log_to_driver=False,
            runtime_env=_worker_runtime_env(),
        )
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-execution INFO banners
    logging.getLogger("ray.data.dataset").addFilter(_drop_cpu_race_warning)
    # A DataError raised while decoding reaches the driver as itself, naming the image.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    try:
        yield
    finally:
        ray.shutdown()


def _join(address: str) -> None:
    """Connect to the running cluster at ``address``; one clear error when it does not answer."""
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"ray.address={address} is a dashboard / job server address: give it as --address "
                          f"to submit the task as a Ray job, or set ray.address to the cluster's GCS "
                          f"address (host:6379), ray://host:10001 or auto")
    try:
        target = address.removeprefix("ray://") if address.startswith("ray://") \
            else bootstrap_address(address)
    except ConnectionError:  # auto, and no cluster runs here
        raise ConfigError(f"ray.address={address}: no Ray cluster runs on this machine (start one with "
                          f"`ray start --head`, or set ray.address: null for a private one)") from None
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError):
        raise ConfigError(f"ray.address={address}: no Ray cluster answers at {target}") from None
    log.info("connecting to Ray cluster at %s", target if address == "auto" else address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env=_worker_runtime_env())
    except ray.exceptions.AuthenticationError as error:
        raise ConfigError(f"ray.address={address}: the cluster refused this machine's Ray token: "
                          f"{error.message}; give its token as RAY_AUTH_TOKEN (or ~/.ray/auth_token) "
                          f"with RAY_AUTH_MODE=token") from None


def allocator_settings_unset() -> dict[str, str]:
    """The workers' allocator settings that this process's environment does not set itself."""
    return {name: value for name, value in WORKER_ALLOCATOR_ENV.items() if name not in os.environ}


def _worker_runtime_env() -> dict:
    """This driver's job-wide runtime env: the allocator settings its environment does not set
    (a Ray job's own runtime env is merged in by Ray)."""
    return {"env_vars": allocator_settings_unset()}


def _drop_cpu_race_warning(record: logging.LogRecord) -> bool:
    """Ray Data warns "no available CPUs" when one materialize starts before the previous one's
    tasks have handed their CPUs back. oi-ray checks before training that CPUs remain for Ray
    Data (tasks/train.py), so here the warning is only that race."""
    return "does not have any available CPUs" not in record.getMessage()


def torch_threads(config: RayConfig, workers: int) -> int:
    """Intra-op threads for each torch process: ``ray.torch_threads``, else a fair share.

    An embedded Ray splits this machine's cores between the ``workers``; on a cluster each
    worker gets ``ray.cpus_per_worker`` threads (Ray's own default would be one).
    """
    if config.torch_threads:
        return config.torch_threads
    if config.address:
        return max(1, int(config.cpus_per_worker))
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def uses_gpus(config: RayConfig) -> bool:
    """``ray.use_gpu`` when set, else whether the connected Ray cluster offers any GPU."""
    if config.use_gpu is not None:
        return config.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0
