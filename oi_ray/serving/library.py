"""A replica's golden library: goldens registered once, their features embedded once per model.

``register`` checks and decodes a golden's shots as an uploaded pair's golden is checked,
embeds them with the model's ``embed`` half and keeps images and features in the
:class:`~oi_ray.serving.goldens.GoldenStore` that every replica shares; ``kept`` gives a
golden's features from this replica's memory (:class:`FeatureCache`), else from the store,
else embedded again from the kept images (a new model, or features never kept). A replica
trusts what it holds for ``recheck_s`` and then reads the golden's manifest again, so a golden
replaced or deleted through another replica is seen within that time.
"""

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from oi_ray.data.assemble import InputGeometry
from oi_ray.feature_cache import FeatureCache
from oi_ray.predictors import HalvesPredictor
from oi_ray.serving.goldens import Golden, GoldenStore
from oi_ray.serving.uploads import RequestError, decode_side

RECHECK_S = 1.0
PROGRESS_S = 5.0  # warm(): a line this often while a replica loads and embeds the library
log = logging.getLogger(__name__)


def _unknown(golden_id: str) -> RequestError:
    return RequestError(404, "unknown_golden", f"no golden is registered as {golden_id!r}; "
                        f"register it with PUT /v1/goldens/{golden_id}")


@dataclass(frozen=True)
class KeptGolden:
    """A golden and its shots' features: ``shots`` x the model's rows per side."""

    golden: Golden
    features: np.ndarray
    checked: float  # time.monotonic() of the last manifest read

    @property
    def nbytes(self) -> int:
        """What it takes of the replica's feature cache."""
        return self.features.nbytes


class GoldenLibrary:
    """Register, look up and forget goldens for one model."""

    def __init__(self, store: GoldenStore, halves: HalvesPredictor, model_sha256: str,
                 geometry: InputGeometry, lights: tuple[str, ...], *, cache_bytes: int, allow_resize: bool,
                 recheck_s: float = RECHECK_S) -> None:
        self.store = store
        self.halves = halves
        self.model_sha256 = model_sha256
        self.geometry = geometry
        self.lights = lights
        self.allow_resize = allow_resize
        self.recheck_s = recheck_s
        self.cache = FeatureCache(cache_bytes)
        self.embedded = 0  # goldens embedded again from their kept images (a new model)
        self._lock = threading.Lock()  # the cache is shared by the replica's worker threads

    def register(self, golden_id: str, shots: list[tuple[bytes, ...]]) -> Golden:
        """Check, embed and keep ``shots`` as ``golden_id`` (nothing is kept when a shot is refused)."""
        pictures = decode_side(shots, "golden", self.geometry, self.lights, allow_resize=self.allow_resize,
                               item="shot")
        features = self.halves.embed(pictures)
        golden = self.store.put(golden_id, self.lights, shots)
        self.store.keep_features(golden, self.model_sha256, features)
        self._remember(KeptGolden(golden, features, time.monotonic()))
        return golden

    def kept(self, golden_id: str) -> KeptGolden:
        """``golden_id``'s features, or a 404 ``unknown_golden`` naming it."""
        with self._lock:
            held = self.cache.get(golden_id)
        if held is not None and time.monotonic() - held.checked < self.recheck_s:
            return held
        golden = self.registered(golden_id)
        if held is not None and held.golden.version == golden.version:
            fresh = KeptGolden(golden, held.features, time.monotonic())
        else:
            features = self.store.features(golden, self.model_sha256)
            if features is None:  # embedded by another model, or never kept: embed the kept images
                pictures = decode_side(self.store.images(golden), "golden", self.geometry, self.lights,
                                       allow_resize=self.allow_resize, item="shot")
                features = self.halves.embed(pictures)
                self.store.keep_features(golden, self.model_sha256, features)
                with self._lock:  # kept() runs in the replica's worker threads
                    self.embedded += 1
            fresh = KeptGolden(golden, features, time.monotonic())
        self._remember(fresh)
        return fresh

    def registered(self, golden_id: str) -> Golden:
        """What is registered as ``golden_id`` now (its manifest), or a 404 ``unknown_golden``."""
        golden = self.store.get(golden_id)
        if golden is None:
            self.forget(golden_id)
            raise _unknown(golden_id)
        return golden

    def delete(self, golden_id: str) -> None:
        """Unregister ``golden_id``, or a 404 ``unknown_golden``."""
        deleted = self.store.delete(golden_id)
        self.forget(golden_id)
        if not deleted:
            raise _unknown(golden_id)

    def forget(self, golden_id: str) -> None:
        """Drop ``golden_id`` from this replica's memory."""
        with self._lock:
            self.cache.discard(golden_id)

    def warm(self) -> int:
        """Load every registered golden's features (embedding those this model lacks), with a
        progress line every :data:`PROGRESS_S` seconds; return how many."""
        count, after, said = 0, None, time.monotonic()
        while page := self.store.ids(after=after):
            for golden_id in page:
                self.kept(golden_id)
                count += 1
                if time.monotonic() - said >= PROGRESS_S:
                    log.info("golden library: %d goldens loaded so far, %d of them embedded for this model",
                             count, self.embedded)
                    said = time.monotonic()
            after = page[-1]
        return count

    def _remember(self, kept: KeptGolden) -> None:
        with self._lock:
            self.cache.put(kept.golden.id, kept)
