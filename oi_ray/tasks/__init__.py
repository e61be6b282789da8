"""One module per task; each exposes run(config: ExperimentConfig)."""
