"""The experiment spec schema: TAO optical_inspection's sections and fields, plus ``ray``.

Field names and defaults follow TAO's ``optical_inspection`` config dataclasses so that TAO
spec files load unchanged; where TAO's dataclass and documentation disagree the choice is
noted (see TAO_REFERENCE.md). The comment on each field is its documentation. TAO keys that
oi-ray accepts but does not act on are listed in ``validate.INERT_KEYS``; setting one warns.

Every closed choice is a ``StrEnum`` here, the one list that validation, the model registry,
the CLI and the docs read. The fields themselves stay ``str`` (a spec writes TAO's strings;
validation names a bad value with its dotted key), and a member equals its string.
"""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ModelType(StrEnum):
    """``model.model_type``: TAO's two models (``Siamese`` is TAO's name for Siamese_1 too) and
    oi-ray's SiameseSpatial."""

    SIAMESE_3 = "Siamese_3"
    SIAMESE_1 = "Siamese_1"
    SIAMESE = "Siamese"
    SPATIAL = "SiameseSpatial"


class Backbone(StrEnum):
    """``model.model_backbone``: the only backbone TAO defines for optical inspection."""

    CUSTOM = "custom"


class ConcatType(StrEnum):
    """``dataset.concat_type``: lightings stacked along the height, or laid out by ``grid_map``."""

    LINEAR = "linear"
    GRID = "grid"


class OptimizerType(StrEnum):
    """``train.optim.type``."""

    ADAM = "Adam"
    SGD = "SGD"


class LrSchedule(StrEnum):
    """``train.optim.lr_schedule``: TAO's constant rate, or a cosine from ``lr`` to 0."""

    CONSTANT = "constant"
    COSINE = "cosine"


class Loss(StrEnum):
    """``train.loss``: the only loss TAO defines."""

    CONTRASTIVE = "contrastive"


class CalibrationRule(StrEnum):
    """``train.calibration.rule``."""

    DEFECT_RECALL = "defect_recall"
    BALANCED_ACCURACY = "balanced_accuracy"


class TrtDataType(StrEnum):
    """``gen_trt_engine.tensorrt.data_type``."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class SearchType(StrEnum):
    """The ``type`` of a ``tune.search_space`` entry (Ray Tune's search-space functions)."""

    CHOICE = "choice"
    GRID = "grid"
    UNIFORM = "uniform"
    LOGUNIFORM = "loguniform"
    QUNIFORM = "quniform"
    RANDINT = "randint"


class SchedulerType(StrEnum):
    """``tune.scheduler.type``: ASHA stops weak trials early at validation epochs."""

    ASHA = "asha"
    NONE = "none"


class TuneMode(StrEnum):
    """``tune.mode``: whether ``tune.metric`` is better high or low."""

    MAX = "max"
    MIN = "min"


class SearchAlg(StrEnum):
    """``tune.search_alg``: random sampling (grid entries give every point), every point of a
    grid-only space, or Optuna (the tune extra)."""

    RANDOM = "random"
    GRID = "grid"
    OPTUNA = "optuna"


class ProxyLocation(StrEnum):
    """``serve.proxy_location``: where Ray Serve runs its HTTP proxies."""

    EVERY_NODE = "EveryNode"
    HEAD_ONLY = "HeadOnly"
    DISABLED = "Disabled"


@dataclass
class SpatialModelConfig:
    """oi-ray's SiameseSpatial model (``model_type: SiameseSpatial``); TAO's models ignore it."""

    stride: int = 2  # the trunk's total downsampling: 2, or 4 for speed (coarser: thin defects fade)
    neighbourhood: int = 3  # odd window of golden features a test feature may match (1: no shift tolerance)
    width: int = 32  # the trunk's channels
    blocks: int = 2  # 3x3 blocks at the feature resolution after the downsampling: more context
    features: int = 16  # channels of the feature maps the two sides compare


@dataclass
class ModelConfig:
    # a ModelType: TAO's Siamese_3 and Siamese_1 (Siamese is TAO's alias of Siamese_1), or
    # oi-ray's SiameseSpatial (docs/models.md)
    model_type: str = ModelType.SIAMESE_3.value
    model_backbone: str = Backbone.CUSTOM.value  # a Backbone
    embedding_vectors: int = 5  # embedding size of each branch (TAO's models)
    margin: float = 2.0  # contrastive-loss margin; also TAO's decision threshold
    imagenet_pretrained: bool = False  # inert (warns): the custom backbone has no ImageNet weights
    spatial: SpatialModelConfig = field(default_factory=SpatialModelConfig)  # oi-ray extension


@dataclass
class OptimConfig:
    type: str = OptimizerType.ADAM.value  # an OptimizerType
    lr: float = 5e-4
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4  # SGD only (TAO's Adam uses none)
    # oi-ray extension, an LrSchedule: the cosine falls from lr to 0 over train.num_epochs, every step
    lr_schedule: str = LrSchedule.CONSTANT.value


@dataclass
class RandomFlip:
    vflip_probability: float = 0.5
    hflip_probability: float = 0.5
    enable: bool = True


@dataclass
class RandomRotation:
    rotate_probability: float = 0.5
    angle_list: list[float] = field(default_factory=lambda: [90.0, 180.0, 270.0])  # first 3 used
    enable: bool = True


@dataclass
class RandomColor:
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.3
    enable: bool = True
    color_probability: float = 0.5  # jitter applied with probability 1 - color_probability (TAO)


@dataclass
class AugmentationConfig:
    rgb_input_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    rgb_input_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    random_flip: RandomFlip = field(default_factory=RandomFlip)
    random_rotate: RandomRotation = field(default_factory=RandomRotation)
    random_color: RandomColor = field(default_factory=RandomColor)
    with_random_blur: bool = True  # Gaussian blur of radius U[0, 1) when augmenting
    with_random_crop: bool = True  # random resized crop (scale 0.8-1.2) when augmenting
    augment: bool = False  # master switch for paired training augmentation
    # oi-ray: each lighting image of each side times its own U[1 - g, 1 + g] while training (a
    # lamp drifting between the test and golden shots); 0: off. Independent of `augment`.
    lighting_gain: float = 0.0


@dataclass
class DataPathFormat:
    csv_path: str | None = None  # CSV with input_path, golden_path, object_name, label
    images_dir: str | None = None  # root that input_path / golden_path are relative to
    # oi-ray extension: a folder or URI that `oi-ray pack` wrote (Parquet shards of whole pairs and
    # their manifest.json), read in place of csv_path and images_dir
    shards: str | None = None

    @property
    def is_set(self) -> bool:
        """Whether the spec names this split's pairs (a CSV or packed shards)."""
        return bool(self.csv_path or self.shards)


@dataclass
class GridMap:
    x: int = 2  # images per row
    y: int = 2  # rows


@dataclass
class DatasetConfig:
    train_dataset: DataPathFormat = field(default_factory=DataPathFormat)
    validation_dataset: DataPathFormat = field(default_factory=DataPathFormat)
    test_dataset: DataPathFormat = field(default_factory=DataPathFormat)  # evaluate
    infer_dataset: DataPathFormat = field(default_factory=DataPathFormat)  # inference
    image_ext: str = ".jpg"  # includes the dot
    batch_size: int = 32
    workers: int = 8  # decode parallelism hint (Ray Data schedules the actual tasks)
    fpratio_sampling: float = 0.1  # defects drawn per PASS pair in training (0 < r <= 1)
    num_input: int | None = None  # number of lightings; default len(input_map), else 1
    input_map: dict[str, int] | None = None  # lighting name -> index; key order is used
    concat_type: str = ConcatType.LINEAR.value  # a ConcatType
    grid_map: GridMap | None = field(default_factory=GridMap)  # used when concat_type is grid
    image_width: int = 128
    image_height: int = 128
    augmentation_config: AugmentationConfig = field(default_factory=AugmentationConfig)


# The spec's splits (dataset.<split>), in the order a dataset is used: train, validate, evaluate, infer
DATASET_SPLITS = ("train_dataset", "validation_dataset", "test_dataset", "infer_dataset")


@dataclass
class PackConfig:
    """oi-ray's ``pack`` task: each configured split's pairs as Parquet shards."""

    results_dir: str = "${results_dir}/pack"  # one folder (or URI) per split under it
    shard_mb: float = 128.0  # each shard's size, about (the last of a split may be smaller)


@dataclass
class CuDNNConfig:
    benchmark: bool = False
    deterministic: bool = True


@dataclass
class TensorBoardLogger:
    enabled: bool = False
    infrequent_logging_frequency: int = 2  # epochs


@dataclass
class CalibrationRuleConfig:
    """How training places the decision threshold on the validation set (oi-ray extension)."""

    # a CalibrationRule. defect_recall: the strictest threshold that still catches target_recall
    # of the validation defects, lowered by safety_margin; balanced_accuracy: the best
    # (recall + 1 - false alarms) / 2
    rule: str = CalibrationRule.DEFECT_RECALL.value
    target_recall: float = 1.0  # share of validation defects the threshold must catch
    safety_margin: float = 0.05  # the threshold sits this share below the weakest caught defect's score


@dataclass
class TrainConfig:
    num_gpus: int = 1  # GPU workers when GPUs exist (reconciled with gpu_ids as TAO does)
    gpu_ids: list[int] = field(default_factory=lambda: [0])  # on Ray only their number counts
    num_nodes: int = 1  # inert (warns): Ray places workers on the cluster's nodes
    seed: int = 1234  # -1 disables seeding
    cudnn: CuDNNConfig = field(default_factory=CuDNNConfig)
    num_epochs: int = 10
    checkpoint_interval: int = 1  # epochs
    validation_interval: int = 1  # epochs
    resume_training_checkpoint_path: str | None = None  # wins over oi_model_latest.pth
    results_dir: str = "${results_dir}/train"
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: str = Loss.CONTRASTIVE.value  # a Loss
    clip_grad_norm: float = 0.0  # 0 disables gradient clipping
    tensorboard: TensorBoardLogger = field(default_factory=TensorBoardLogger)
    pretrained_model_path: str | None = None  # weights only; training starts at epoch 0
    # oi-ray extensions (not in TAO's schema)
    mixed_precision: bool = False  # torch autocast: bf16 on CPU, fp16 (with grad scaling) on GPU
    channels_last: bool = False  # NHWC memory layout for the convolutional trunk
    calibration: CalibrationRuleConfig = field(default_factory=CalibrationRuleConfig)


@dataclass
class EvaluateConfig:
    num_gpus: int = 1  # scoring replicas when the cluster has GPUs
    gpu_ids: list[int] = field(default_factory=lambda: [0])  # on Ray only their number counts
    num_nodes: int = 1  # inert (warns): Ray places replicas on the cluster's nodes
    checkpoint: str | None = None  # .pth (or .onnx / .engine once exported)
    trt_engine: str | None = None  # TensorRT engine, as TAO Deploy accepts
    results_dir: str = "${results_dir}/evaluate"
    batch_size: int = -1  # <= 0: dataset.batch_size
    # oi-ray extension: decision threshold; None = the checkpoint's calibrated one, else model.margin
    threshold: float | None = None
    # oi-ray extension: a CSV column (e.g. label, or an extra one such as a defect type) to report
    # defect recall and false alarms per value of; None = none. The evaluated CSV must have it
    group_by: str | None = None


@dataclass
class InferenceConfig:
    num_gpus: int = 1  # scoring replicas when the cluster has GPUs
    gpu_ids: list[int] = field(default_factory=lambda: [0])  # on Ray only their number counts
    num_nodes: int = 1  # inert (warns): Ray places replicas on the cluster's nodes
    checkpoint: str | None = None
    trt_engine: str | None = None
    results_dir: str = "${results_dir}/inference"
    batch_size: int = 1  # <= 0: dataset.batch_size
    # oi-ray extension: decision threshold; None = the checkpoint's calibrated one, else model.margin
    threshold: float | None = None


@dataclass
class ExportConfig:
    results_dir: str = "${results_dir}/export"
    gpu_id: int = 0  # inert (warns): export traces on the CPU
    checkpoint: str | None = None
    onnx_file: str | None = None
    opset_version: int = 17
    on_cpu: bool = False
    input_height: int | None = None  # default: the assembled input height; must match it
    input_width: int | None = None  # default: the assembled input width; must match it
    input_channel: int = 3
    batch_size: int = -1  # -1: dynamic batch axis named "batch"
    do_constant_folding: bool = False
    verbose: bool = False


@dataclass
class CalibrationConfig:
    """int8 calibration; inert (warns) while int8 engines are refused."""

    cal_image_dir: list[str] = field(default_factory=list)
    cal_cache_file: str | None = None
    cal_batch_size: int = 1
    cal_batches: int = 1


@dataclass
class TensorRTConfig:
    data_type: str = TrtDataType.FP32.value  # a TrtDataType
    workspace_size: int = 1024  # MiB
    min_batch_size: int = 1
    opt_batch_size: int | None = None  # default dataset.batch_size
    max_batch_size: int | None = None  # default dataset.batch_size
    layers_precision: list[str] = field(default_factory=list)  # inert (warns): data_type for all
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


@dataclass
class GenTrtEngineConfig:
    results_dir: str = "${results_dir}/gen_trt_engine"
    gpu_id: int = 0  # inert (warns): TensorRT builds on the GPU CUDA exposes (CUDA_VISIBLE_DEVICES)
    onnx_file: str | None = None
    trt_engine: str | None = None
    timing_cache: str | None = None
    batch_size: int = -1  # > 0: an engine of that fixed batch; -1: the tensorrt min/opt/max profile
    verbose: bool = False
    tensorrt: TensorRTConfig = field(default_factory=TensorRTConfig)


@dataclass
class DatasetConvertConfig:
    """TAO's dataset_convert section; accepted so TAO specs load. Inert: oi-ray has no
    dataset_convert task, and setting any key warns."""

    root_dataset_dir: str | None = None
    data_convert_output_dir: str | None = None
    train_pcb_dataset_dir: str | None = None
    val_pcb_dataset_dir: str | None = None
    all_pcb_dataset_dir: str | None = None
    golden_csv_dir: str | None = None
    project_name: str | None = None
    bot_top: str | None = None


@dataclass
class WandBConfig:
    """TAO's wandb section; accepted so TAO specs load. Inert: oi-ray does not log to Weights &
    Biases, and setting any key warns."""

    enable: bool = False  # TAO's dataclass says True; False here so specs without wandb load quietly
    project: str = "TAO Toolkit"
    entity: str | None = ""
    tags: list[str] = field(default_factory=lambda: ["tao-toolkit"])
    reinit: bool = False
    sync_tensorboard: bool = False
    save_code: bool = False
    name: str = "TAO Toolkit Training"


@dataclass
class RuntimeEnvConfig:
    """Ray runtime environment of a job submitted with ``--cluster`` / ``--address``."""

    pip: list[str] = field(default_factory=list)  # packages the job installs first
    env_vars: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = None  # a local folder (uploaded with the job) or a remote zip URI


@dataclass
class RayConfig:
    """oi-ray's own section: where and how the Ray jobs run."""

    address: str | None = None  # None: embedded local Ray; "auto" or ray://host:10001: a cluster
    num_workers: int | None = None  # training workers; default train.num_gpus with GPUs, else 1
    use_gpu: bool | None = None  # default: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    torch_threads: int | None = None  # per worker; default: local cores // workers, cluster cpus_per_worker
    gpus_per_worker: float = 1.0
    storage_path: str = "${train.results_dir}/ray"  # Ray Train storage (shared by all nodes)
    max_failures: int = 0  # worker-group restarts from the last checkpoint
    num_cpus: int | None = None  # logical CPUs of an embedded Ray; default max(4, cores)
    object_store_memory_mb: int | None = None  # embedded Ray object store; default Ray's
    include_dashboard: bool = False  # embedded Ray: Ray's dashboard and state API on 127.0.0.1:8265
    metrics_export_port: int | None = None  # embedded Ray: Prometheus metrics on this port (default any)
    # A submitted job's id (default oi-ray-<task>-<time>), which is also its Ray Train run name:
    # resubmitting a training job with the same id resumes it from its last checkpoint.
    job_id: str | None = None
    runtime_env: RuntimeEnvConfig = field(default_factory=RuntimeEnvConfig)


@dataclass
class SearchDimension:
    """One entry of ``tune.search_space``: how a trial draws the value of its spec key."""

    type: str = SearchType.CHOICE.value  # a SearchType
    values: list[Any] | None = None  # choice, grid
    low: float | None = None  # uniform, loguniform, quniform, randint (inclusive)
    high: float | None = None  # uniform, loguniform, quniform (inclusive); randint (exclusive)
    q: float | None = None  # quniform: the step values are rounded to


@dataclass
class TuneScheduler:
    type: str = SchedulerType.ASHA.value  # a SchedulerType
    grace_period: int = 1  # epochs every trial runs before it may be stopped
    reduction_factor: float = 2.0  # ASHA keeps 1/reduction_factor of the trials at each rung


@dataclass
class TuneTrialResources:
    """What one trial trains with; unset values are the ``ray`` section's."""

    num_workers: int | None = None  # training workers per trial (default ray.num_workers, else 1)
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None


@dataclass
class TuneConfig:
    """oi-ray's own section: hyperparameter sweeps with ``oi-ray tune`` on Ray Tune."""

    # dotted spec key -> how to sample it, e.g. {model.margin: {type: uniform, low: 0.5, high: 3}}
    search_space: dict[str, SearchDimension] = field(default_factory=dict)
    num_samples: int = 4  # trials; with grid entries, repeats of the whole grid
    metric: str = "val_auroc"  # a validation metric every epoch reports (see train's status.json)
    mode: str = TuneMode.MAX.value  # a TuneMode
    scheduler: TuneScheduler = field(default_factory=TuneScheduler)
    search_alg: str = SearchAlg.RANDOM.value  # a SearchAlg
    max_concurrent_trials: int | None = None  # default: as many as the cluster's CPUs/GPUs hold
    resources_per_trial: TuneTrialResources = field(default_factory=TuneTrialResources)
    # true: the images are decoded once for all trials; false: each trial decodes its own
    # (slower, but then the image size and augmentation switch can be swept)
    share_decoded_images: bool = True
    results_dir: str = "${results_dir}/tune"
    name: str = "sweep"  # the sweep's folder under results_dir; `--resume` continues it


@dataclass
class ServeBatching:
    """Ray Serve dynamic batching (``@serve.batch``) of the pairs of concurrent requests."""

    max_batch_size: int = 32  # pairs scored in one model call
    # How long a batch waits to fill after its first pair. 0: no wait; pairs that arrive while the
    # model runs still form one batch (they wait for the model anyway).
    batch_wait_timeout_s: float = 0.0


@dataclass
class ServeAutoscaling:
    """Ray Serve ``autoscaling_config`` of the scoring deployment."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None  # default min_replicas
    target_ongoing_requests: float = 8.0  # per replica; more ongoing requests add replicas
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0


@dataclass
class ServeConfig:
    """oi-ray's own section: online scoring with ``oi-ray serve`` on Ray Serve."""

    model: str | None = None  # .onnx, .engine or .pth; default the ONNX model `oi-ray export` writes
    app_name: str = "oi-ray"  # Ray Serve application name
    host: str = "127.0.0.1"  # HTTP bind address; 0.0.0.0 exposes the service to the network
    port: int = 8000
    proxy_location: str = ProxyLocation.EVERY_NODE.value  # a ProxyLocation
    route_prefix: str = "/"  # the API lives under {route_prefix}v1/...
    max_pairs_per_request: int = 64
    max_request_mb: float = 64.0  # larger request bodies are refused (413)
    request_timeout_s: float = 30.0  # Serve's HTTP proxy ends a request that takes longer (408)
    batching: ServeBatching = field(default_factory=ServeBatching)
    autoscaling_config: ServeAutoscaling = field(default_factory=ServeAutoscaling)
    max_ongoing_requests: int = 32  # per replica, in progress at once
    max_queued_requests: int = 128  # waiting for a replica; beyond this Serve answers 503
    num_cpus: float = 1.0  # per replica (decoding uploads and CPU scoring)
    num_gpus: float = 0.0  # per replica, fractional allowed; > 0 scores on the GPU
    threshold: float | None = None  # decision threshold; None: the model's calibrated one, else margin
    auth_token_env: str | None = None  # env var holding a bearer token every request must carry
    resize_images: bool = True  # True: other image sizes are resized as in training; False: refused
    # the golden library (PUT /v1/goldens/{id}): a folder or a URI (s3://, gs://) every replica
    # shares; None: pairs upload their goldens
    golden_store: str | None = None
    golden_cache_mb: float = 256.0  # per replica: golden features kept in memory, least recently used out


@dataclass
class ExperimentConfig:
    results_dir: str = "results"  # root of every task's outputs
    encryption_key: str | None = None
    model_name: str | None = None  # inert (warns): models are named by model.model_type
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    gen_trt_engine: GenTrtEngineConfig = field(default_factory=GenTrtEngineConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    dataset_convert: DatasetConvertConfig = field(default_factory=DatasetConvertConfig)
    wandb: WandBConfig = field(default_factory=WandBConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
