"""``oi-ray inference``: score ``dataset.infer_dataset`` and write ``inference.csv``.

The CSV holds the input columns in input order, then ``siamese_score`` (the pair distance,
TAO's column) and ``decision`` (``PASS`` or ``NO_PASS`` at the decision threshold). It is
written atomically and always has exactly one row per input row; the resolved spec is saved
beside it. ``inference.results_dir`` may be a bucket's URI.
"""

import logging

from oi_ray import storage
from oi_ray.config import save_resolved_spec
from oi_ray.config.schema import ExperimentConfig
from oi_ray.decision import NO_PASS, decisions
from oi_ray.tasks.scoring_setup import score_split

log = logging.getLogger(__name__)
SPLITS = ("infer_dataset", "test_dataset", "validation_dataset")
SCORE_COLUMN = "siamese_score"
DECISION_COLUMN = "decision"


def run(config: ExperimentConfig) -> None:
    """Write ``inference.csv`` and the resolved spec for ``inference.checkpoint`` into
    ``inference.results_dir``."""
    scored = score_split(config, "inference", SPLITS, require_labels=False)
    frame = scored.table.rows.copy()
    frame[SCORE_COLUMN] = scored.scores.distances
    frame[DECISION_COLUMN] = decisions(scored.scores.distances, scored.threshold)
    results_dir = storage.output_folder(config.inference.results_dir)
    output = storage.join(results_dir, "inference.csv")
    if storage.file_size(output) is not None:
        log.info("replacing the earlier %s", output)
    storage.write_atomically(output, frame.to_csv(index=False).encode())
    spec = save_resolved_spec(config, results_dir)
    flagged = int((frame[DECISION_COLUMN] == NO_PASS).sum())
    log.info("wrote %s and %s: %d pairs, %d flagged NO_PASS at threshold %.4g; threshold source: %s",
             output, storage.name(spec), len(frame), flagged, scored.threshold, scored.threshold_source)
