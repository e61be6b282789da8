"""Experiment spec: schema, loading and validation."""

from oi_ray.config.loader import load_config, save_resolved_spec, to_yaml
from oi_ray.config.schema import ExperimentConfig

__all__ = ["ExperimentConfig", "load_config", "save_resolved_spec", "to_yaml"]
