"""A replica's golden features in memory, bounded in bytes, least recently used out first."""

from collections import OrderedDict
from collections.abc import Hashable

import numpy as np


class FeatureCache:
    """Features by key (a golden's id and version), at most ``max_bytes`` of arrays in all.

    An array larger than the whole bound is not kept (the caller still has it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Hashable, np.ndarray] = OrderedDict()

    def get(self, key: Hashable) -> np.ndarray | None:
        """The features kept under ``key`` (now the most recently used), or None."""
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
        return features

    def put(self, key: Hashable, features: np.ndarray) -> None:
        """Keep ``features`` under ``key``, dropping the least recently used beyond the bound."""
        self.discard(key)
        if features.nbytes > self.max_bytes:
            return
        self._entries[key] = features
        self.bytes += features.nbytes
        while self.bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.nbytes

    def discard(self, key: Hashable) -> None:
        """Forget ``key`` (a golden replaced or deleted)."""
        features = self._entries.pop(key, None)
        if features is not None:
            self.bytes -= features.nbytes

    def __len__(self) -> int:
        return len(self._entries)
