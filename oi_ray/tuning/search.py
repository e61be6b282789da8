"""``tune.search_space``: checked before any trial starts, then turned into Ray Tune domains.

Every entry is keyed by a dotted spec key and says how a trial draws its value:
``model.*``, ``train.*`` (but not where results go, where training resumes from, or the GPU
count, which ``tune.resources_per_trial`` sets) and ``dataset.*`` except the splits and
lightings. A sweep decodes the images once for all trials, so the image size and the
augmentation switch (it changes the resampling of the decode) can be swept only when each
trial decodes its own (``tune.share_decoded_images: false``). Each value a trial could get at
the edges of its range (every choice, every grid point, low and high) is applied to the spec
and validated, so a value the schema would refuse fails the sweep before it starts, naming
the entry.
"""

from typing import Any

from ray import tune

from oi_ray.config import config_from_mapping
from oi_ray.config.schema import SearchDimension, SearchType
from oi_ray.errors import ConfigError

SWEEPABLE_SECTIONS = ("model.", "train.", "dataset.")
FIXED_KEYS = (  # prefixes a trial must share with the sweep
    "train.results_dir", "train.resume_training_checkpoint_path", "train.num_gpus", "train.gpu_ids",
    "train.num_nodes", "dataset.train_dataset", "dataset.validation_dataset", "dataset.test_dataset",
    "dataset.infer_dataset", "dataset.image_ext", "dataset.num_input", "dataset.input_map",
)
DECODE_KEYS = (  # prefixes that change the decoded pixels
    "dataset.image_width", "dataset.image_height", "dataset.augmentation_config.augment",
)


def search_problems(search_space: dict[str, SearchDimension], base: dict[str, Any],
                    shared_decode: bool = True) -> list[str]:
    """Every problem of ``search_space`` against the resolved spec ``base`` (empty: fine);
    ``shared_decode``: the trials share one decode of the images."""
    problems = []
    for key, dimension in search_space.items():
        name = f"tune.search_space.{key}"
        shape = _shape_problem(key, dimension, shared_decode)
        if shape:
            problems.append(f"{name}: {shape}")
            continue
        for value in _edge_values(dimension):
            try:
                config_from_mapping(base, name, {key: value})
            except ConfigError as error:
                problems.append(f"{name}: the value {value!r} is refused: {error}")
                break
    return problems


def _shape_problem(key: str, dimension: SearchDimension, shared_decode: bool) -> str | None:
    """What is wrong with the entry itself, or None."""
    if not key.startswith(SWEEPABLE_SECTIONS):
        return f"only model.*, train.* and dataset.* keys can be swept, not {key}"
    if key.startswith(FIXED_KEYS):
        return "every trial shares it with the sweep (the splits, the results folder or the GPUs)"
    if shared_decode and key.startswith(DECODE_KEYS):
        return ("it changes the decoded images, which the trials share; set "
                "tune.share_decoded_images=false to have each trial decode its own")
    kind, low, high = dimension.type, dimension.low, dimension.high
    if kind not in list(SearchType):
        return f"type {kind!r} is not one of {[str(choice) for choice in SearchType]}"
    if kind in (SearchType.CHOICE, SearchType.GRID):
        return None if dimension.values else f"type {kind} needs a non-empty list of values"
    if low is None or high is None:
        return f"type {kind} needs low and high"
    if kind == SearchType.RANDINT and not (float(low).is_integer() and float(high).is_integer()):
        return f"randint needs integer bounds, got low={low}, high={high}"
    if low > high:
        return f"low={low} is above high={high}"
    if kind == SearchType.RANDINT and low == high:
        return "randint needs low < high (high is excluded)"
    if kind == SearchType.LOGUNIFORM and low <= 0:
        return f"loguniform needs low > 0 (the logarithm of {low} is undefined)"
    if kind == SearchType.QUNIFORM and (dimension.q is None or dimension.q <= 0):
        return f"quniform needs a step q > 0, got {dimension.q}"
    return None


def _edge_values(dimension: SearchDimension) -> list[Any]:
    """Values a trial can get that the schema must accept: every listed one, else the bounds."""
    if dimension.type in (SearchType.CHOICE, SearchType.GRID):
        return list(dimension.values)
    if dimension.type == SearchType.RANDINT:
        return [int(dimension.low), int(dimension.high) - 1]
    return [dimension.low, dimension.high]


def param_space(search_space: dict[str, SearchDimension]) -> dict[str, Any]:
    """Ray Tune's ``param_space``: one domain per dotted key."""
    return {key: _domain(dimension) for key, dimension in search_space.items()}


def _domain(dimension: SearchDimension) -> Any:
    kind, low, high = dimension.type, dimension.low, dimension.high
    if kind == SearchType.CHOICE:
        return tune.choice(list(dimension.values))
    if kind == SearchType.GRID:
        return tune.grid_search(list(dimension.values))
    if kind == SearchType.UNIFORM:
        return tune.uniform(low, high)
    if kind == SearchType.LOGUNIFORM:
        return tune.loguniform(low, high)
    if kind == SearchType.QUNIFORM:
        return tune.quniform(low, high, dimension.q)
    return tune.randint(int(low), int(high))


def grid_points(search_space: dict[str, SearchDimension]) -> int:
    """How many grid points the grid entries span (1 without grid entries)."""
    points = 1
    for dimension in search_space.values():
        if dimension.type == SearchType.GRID:
            points *= len(dimension.values)
    return points
