"""What a service scored against each registered golden: a part whose distances drift upward is
a line problem (a worn stencil, a new reel, a lamp), not a model problem.

Each replica tallies the pairs it scored per golden id (count, NO_PASS count, a distance
histogram and the most recent distances) and writes its tally to the golden store at most
every ``flush_s`` seconds; ``GET /v1/goldens/{id}/stats`` merges every replica's.
"""

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from oi_ray.decision import NO_PASS
from oi_ray.serving.goldens import GoldenStore

RECENT_PAIRS = 200  # per replica and golden: the window the recent mean is taken over
FLUSH_S = 10.0


@dataclass
class GoldenTally:
    """One replica's pairs scored against one golden."""

    bounds: list[float]  # histogram bucket upper bounds; the last bucket is open
    pairs: int = 0
    no_pass: int = 0
    sum: float = 0.0
    counts: list[int] = field(default_factory=list)
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_PAIRS))
    last: float = 0.0

    def add(self, distances: np.ndarray, verdicts: np.ndarray) -> None:
        """Count the pairs just scored against this golden."""
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        for bucket in np.searchsorted(self.bounds, distances, side="left"):
            self.counts[int(bucket)] += 1
        self.pairs += len(distances)
        self.no_pass += int(np.count_nonzero(verdicts == NO_PASS))
        self.sum += float(np.sum(distances))
        self.recent.extend(float(distance) for distance in distances)
        self.last = time.time()

    def document(self) -> dict:
        """The tally as the store keeps it."""
        return {"pairs": self.pairs, "no_pass": self.no_pass, "sum": self.sum, "bounds": self.bounds,
                "counts": self.counts, "recent": list(self.recent), "last": self.last}


def merged(documents: list[dict], golden_id: str) -> dict:
    """Every replica's tally of ``golden_id`` as one answer."""
    pairs = sum(document["pairs"] for document in documents)
    no_pass = sum(document["no_pass"] for document in documents)
    recent = [distance for document in documents for distance in document["recent"]]
    counts = np.sum([document["counts"] for document in documents if document["counts"]], axis=0)
    return {
        "golden_id": golden_id, "pairs": pairs, "no_pass": no_pass,
        "no_pass_rate": no_pass / pairs if pairs else None,
        "mean_distance": sum(document["sum"] for document in documents) / pairs if pairs else None,
        "recent_mean_distance": float(np.mean(recent)) if recent else None, "recent_pairs": len(recent),
        "histogram": {"upper_bounds": documents[0]["bounds"] if documents else [],
                      "counts": counts.tolist() if pairs else []},
        "last_scored": max((document["last"] for document in documents), default=None),
        "replicas": len(documents),
    }


class GoldenStats:
    """A replica's tallies, written to the store every ``flush_s`` seconds at most."""

    def __init__(self, store: GoldenStore, replica: str, bounds: list[float],
                 flush_s: float = FLUSH_S) -> None:
        self.store = store
        self.replica = replica
        self.bounds = bounds
        self.flush_s = flush_s
        self.tallies: dict[str, GoldenTally] = {}
        self.unwritten: set[str] = set()
        self.written = time.monotonic()

    def record(self, golden_id: str, distances: np.ndarray, verdicts: np.ndarray) -> None:
        """Tally pairs scored against ``golden_id``."""
        self.tallies.setdefault(golden_id, GoldenTally(self.bounds)).add(distances, verdicts)
        self.unwritten.add(golden_id)

    def due(self) -> bool:
        """Whether tallies wait to be written and ``flush_s`` has passed."""
        return bool(self.unwritten) and time.monotonic() - self.written >= self.flush_s

    def flush(self) -> None:
        """Write the tallies changed since the last flush."""
        self.written = time.monotonic()
        for golden_id in sorted(self.unwritten):
            self.store.keep_stats(golden_id, self.replica, self._document(golden_id))
        self.unwritten.clear()

    def forget(self, golden_id: str) -> None:
        """Drop the tally of a deleted golden."""
        self.tallies.pop(golden_id, None)
        self.unwritten.discard(golden_id)

    def answer(self, golden_id: str) -> dict:
        """Every replica's tally of ``golden_id``, this replica's as it is now."""
        others = [document for document in self.store.stats(golden_id)
                  if document.get("replica") != self.replica]
        own = [self._document(golden_id)] if golden_id in self.tallies else []
        return merged([*others, *own], golden_id)

    def _document(self, golden_id: str) -> dict:
        """This replica's tally of ``golden_id`` as the store keeps it, named by replica."""
        return {**self.tallies[golden_id].document(), "replica": self.replica}
