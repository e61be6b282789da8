"""PNG plots of an evaluation: ROC, precision-recall and the distance histogram per class.

Each title names the split and the model file; the ROC and PR curves carry their area, the
operating point of the decision threshold and the score of a guess (the ROC diagonal; on the
PR plot, the share of defects).
"""

from io import BytesIO
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # object API: no pyplot state, no display backend

from oi_ray.fileio import write_atomically
from oi_ray.metrics import aupr, auroc, confusion_matrix, pr_curve, roc_curve

CURVE_COLOUR = "tab:blue"
POINT_COLOUR = "tab:red"


def write_evaluation_plots(distances: np.ndarray, targets: np.ndarray, threshold: float, margin: float,
                           folder: Path, *, split: str, model_file: Path) -> list[Path]:
    """Write ``roc.png``, ``pr.png`` and ``distance_histogram.png`` into ``folder``."""
    source = f"{split}, {Path(model_file).name}"
    pairs = confusion_matrix(distances, targets, threshold)
    defects = pairs["caught_defect"] + pairs["missed_defect"]
    recall = pairs["caught_defect"] / defects
    false_alarms = pairs["false_alarm"] / (pairs["false_alarm"] + pairs["true_pass"])
    flagged = pairs["caught_defect"] + pairs["false_alarm"]
    point_label = f"threshold {threshold:.3g}"
    written = []

    figure, axes = _figure(5.5, 5.5)
    roc_false_alarm, roc_recall, _ = roc_curve(distances, targets)
    # straight segments: tied scores move diagonally, as the trapezoidal AUROC counts them
    axes.plot(roc_false_alarm, roc_recall, color=CURVE_COLOUR,
              label=f"model (AUROC {auroc(distances, targets):.3f})")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance (AUROC 0.5)")
    axes.plot(false_alarms, recall, "o", color=POINT_COLOUR,
              label=f"{point_label}: recall {recall:.0%}, false alarms {false_alarms:.0%}")
    axes.set(xlabel="false-alarm rate (share of PASS pairs flagged)",
             ylabel="defect recall (share of defects flagged)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
             title=f"ROC: {source}")
    axes.legend(loc="lower right", fontsize="small")
    written.append(_save(figure, folder / "roc.png"))

    figure, axes = _figure(5.5, 5.5)
    pr_recall, precision = pr_curve(distances, targets)
    prevalence = defects / len(targets)
    # each precision holds from the previous recall up to its own: the area drawn is the AUPR
    axes.plot(np.r_[0.0, pr_recall], np.r_[precision[0], precision], drawstyle="steps-pre",
              color=CURVE_COLOUR, label=f"model (AUPR {aupr(distances, targets):.3f})")
    axes.axhline(prevalence, linestyle=":", color="grey",
                 label=f"chance: share of defects ({prevalence:.0%})")
    if flagged:  # precision is undefined when nothing is flagged
        precision_at = pairs["caught_defect"] / flagged
        axes.plot(recall, precision_at, "o", color=POINT_COLOUR,
                  label=f"{point_label}: recall {recall:.0%}, precision {precision_at:.0%}")
    axes.set(xlabel="defect recall (share of defects flagged)",
             ylabel="precision (share of flagged pairs that are defects)",
             xlim=(-0.02, 1.02), ylim=(0, 1.02), title=f"Precision-recall: {source}")
    axes.legend(loc="lower left", fontsize="small")
    written.append(_save(figure, folder / "pr.png"))

    figure, axes = _figure(7, 4)
    bins = np.histogram_bin_edges(distances, bins=40)
    for label, name in ((0, "PASS"), (1, "defect")):
        axes.hist(distances[targets == label], bins=bins, alpha=0.6, label=name)
    axes.axvline(threshold, color="black", label=f"decision threshold {threshold:.3g}")
    axes.axvline(margin, color="black", linestyle="--", label=f"margin {margin:.3g} (TAO's threshold)")
    axes.set(xlabel="pair distance", ylabel="pairs", title=f"Distance per class: {source}")
    axes.legend(fontsize="small")
    written.append(_save(figure, folder / "distance_histogram.png"))
    return written


def write_sweep_plot(curves: dict[str, list[tuple[int, float]]], metric: str, path: Path, *,
                     best: str | None) -> Path:
    """``metric`` over epochs, one line per trial (the best one drawn thicker); write ``path``."""
    figure, axes = _figure(7, 4.5)
    for name, points in curves.items():
        if points:
            epochs, values = zip(*points, strict=True)
            axes.plot(epochs, values, marker="o", markersize=3, linewidth=2.5 if name == best else 1,
                      label=f"{name} (best)" if name == best else name)
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} per trial")
    if curves:
        axes.legend(fontsize=7, loc="best")
    return _save(figure, path)


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(width, height))
    return figure, figure.subplots()


def _save(figure: Figure, path: Path) -> Path:
    buffer = BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    write_atomically(path, buffer.getvalue())
    return path
