"""Data: pairs CSV validation, input assembly, augmentation, Ray Data pipelines, synthetic data."""
