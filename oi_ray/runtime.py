"""Starting or joining Ray, in one place, with defaults that suit small machines."""

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray
import ray.data

from oi_ray.config.schema import RayConfig

log = logging.getLogger(__name__)

MIN_LOCAL_CPUS = 4  # logical CPUs, so Ray Data has room next to two training workers
RAY_ENV_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",  # embedded single-user cluster on loopback: no token warning
    "RAY_DEDUP_LOGS": "1",
}


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
        log.info("connecting to Ray cluster at %s", config.address)
        ray.init(address=config.address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        num_cpus = config.num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
        memory = config.object_store_memory_mb
        ray.init(
            address="local",  # a private Ray, even when another one runs on this machine
            num_cpus=num_cpus,
            object_store_memory=memory * 1024 * 1024 if memory else None,
            include_dashboard=config.include_dashboard,
            dashboard_host="127.0.0.1",
            _metrics_export_port=config.metrics_export_port,
            logging_level=logging.WARNING,
            # Workers' output stays in Ray's log files; the driver draws progress and summaries.
            log_to_driver=False,
        )
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-execution INFO banners
    logging.getLogger("ray.data.dataset").addFilter(_drop_cpu_race_warning)
    # A DataError raised while decoding reaches the driver as itself, naming the image.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    try:
        yield
    finally:
        ray.shutdown()


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
