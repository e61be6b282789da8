"""PNG plots of an evaluation: ROC, precision-recall and the distance histogram per class."""

from io import BytesIO
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # object API: no pyplot state, no display backend

from oi_ray.fileio import write_atomically
from oi_ray.metrics import pr_curve, roc_curve


def write_evaluation_plots(distances: np.ndarray, targets: np.ndarray, threshold: float, margin: float,
                           folder: Path) -> list[Path]:
    """Write ``roc.png``, ``pr.png`` and ``distance_histogram.png`` into ``folder``."""
    false_alarm, recall, _ = roc_curve(distances, targets)
    pr_recall, precision = pr_curve(distances, targets)
    written = []

    figure = Figure(figsize=(5, 5))
    axes = figure.subplots()
    axes.plot(false_alarm, recall, drawstyle="steps-post")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set(xlabel="false-alarm rate (PASS pairs flagged)", ylabel="defect recall", title="ROC")
    written.append(_save(figure, folder / "roc.png"))

    figure = Figure(figsize=(5, 5))
    axes = figure.subplots()
    axes.plot(pr_recall, precision, drawstyle="steps-post")
    axes.set(xlabel="defect recall", ylabel="precision", ylim=(0, 1.02), title="Precision-recall")
    written.append(_save(figure, folder / "pr.png"))

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    bins = np.histogram_bin_edges(distances, bins=40)
    for label, name in ((0, "PASS"), (1, "defect")):
        axes.hist(distances[targets == label], bins=bins, alpha=0.6, label=name)
    axes.axvline(threshold, color="black", label=f"threshold {threshold:.3g}")
    axes.axvline(margin, color="black", linestyle="--", label=f"margin {margin:.3g}")
    axes.set(xlabel="pair distance", ylabel="pairs", title="Distance per class")
    axes.legend()
    written.append(_save(figure, folder / "distance_histogram.png"))
    return written


def _save(figure: Figure, path: Path) -> Path:
    buffer = BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    write_atomically(path, buffer.getvalue())
    return path
