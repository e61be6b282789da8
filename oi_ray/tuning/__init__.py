"""Hyperparameter sweeps on Ray Tune: the search space, the trial, and the sweep's results."""
