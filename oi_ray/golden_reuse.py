"""Scoring a split whose rows share goldens: each distinct golden is embedded once.

An AOI dataset compares many test shots with the same golden (one golden folder per part, many
boards). :class:`GoldenReuse` scores pairs with the model's two halves (``oi_ray.model.parts``):
a batch's test sides in one ``embed`` call, only the goldens not seen before in another, then one
``compare`` call. Goldens are recognised by their decoded pictures (a digest of the pixels), so
two rows that name the same files, or copies of them, share one embedding; the features are
kept across batches, least recently used out first, within a bound in bytes.
"""

import hashlib

import numpy as np

from oi_ray.feature_cache import FeatureCache
from oi_ray.predictors import HalvesPredictor

GOLDEN_FEATURES_BYTES = 256 * 2**20  # a scoring replica's kept golden features (SiameseSpatial: ~0.6 MB each)


def picture_digest(picture: np.ndarray) -> bytes:
    """A key for one side's decoded picture: equal pixels, equal key."""
    return hashlib.blake2b(np.ascontiguousarray(picture).data, digest_size=16).digest()


class GoldenReuse:
    """Distances of pairs from a model's halves, each distinct golden embedded once.

    Gives the same distances as the whole model (the halves are checked against it when they
    are exported, to 1e-5), with the work of the repeated goldens left out."""

    threshold = None  # the driver chooses the threshold (the model file carries it)

    def __init__(self, halves: HalvesPredictor, cache_bytes: int = GOLDEN_FEATURES_BYTES) -> None:
        self.halves = halves
        self.cache = FeatureCache(cache_bytes)
        self.goldens_embedded = 0  # distinct goldens embedded so far

    def distances(self, test: np.ndarray, golden: np.ndarray) -> np.ndarray:
        """``(B, H', W', 3)`` uint8 test and golden pictures -> ``(B,)`` float32 distances."""
        if len(test) == 0:
            return np.zeros(0, np.float32)
        keys = [picture_digest(picture) for picture in golden]
        first: dict[bytes, int] = {}  # each distinct golden's first row in the batch
        for index, key in enumerate(keys):
            first.setdefault(key, index)
        features = {key: self.cache.get(key) for key in first}
        new = [key for key, kept in features.items() if kept is None]
        if new:
            embedded = self.halves.embed(golden[[first[key] for key in new]])
            rows = len(embedded) // len(new)
            for index, key in enumerate(new):
                features[key] = embedded[index * rows:(index + 1) * rows].copy()
                self.cache.put(key, features[key])
            self.goldens_embedded += len(new)
        golden_features = np.concatenate([features[key] for key in keys])
        distances = self.halves.compare(self.halves.embed(test), golden_features)
        return np.asarray(distances, dtype=np.float32).reshape(-1)
