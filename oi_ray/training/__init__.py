"""Siamese training: one optimisation step (``step``), the epoch on a rank (``epoch``), the Ray
Train worker (``worker``) and the driver side that ``oi-ray train`` and sweeps share (``driver``)."""
