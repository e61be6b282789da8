"""Siamese training on Ray Train: the driver side lives in oi_ray.tasks.train."""
