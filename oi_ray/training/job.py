"""What the driver hands every Ray Train worker: the spec, the decoded splits, where to write."""

from dataclasses import dataclass

from oi_ray.config.schema import ExperimentConfig
from oi_ray.data.dataset import DecodedCache, PipelineSpec
from oi_ray.training.progress import ProgressFeed


@dataclass
class TrainJob:
    """Everything the workers need, built once by the driver (``oi_ray.training.driver``)."""

    config: ExperimentConfig
    pipeline: PipelineSpec
    train_cache: DecodedCache
    validation_cache: DecodedCache | None
    results_dir: str  # an absolute local path, or a URI
    resume_from: str | None  # .pth to continue from (oi_model_latest.pth or the spec's path)
    threads: int
    progress: ProgressFeed
    data_seed: int  # seeds the epoch plans: train.seed, or one drawn by the driver when it is -1
