"""Experiment spec: schema, loading and validation."""

from oi_ray.config.loader import config_from_mapping, load_config, save_resolved_spec, to_yaml
from oi_ray.config.schema import ExperimentConfig

__all__ = ["ExperimentConfig", "config_from_mapping", "load_config", "save_resolved_spec", "to_yaml"]
