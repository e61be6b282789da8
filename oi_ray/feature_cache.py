"""Features in memory, bounded in bytes, least recently used out first: a serving replica's
goldens, or the distinct goldens of a split being scored."""

from collections import OrderedDict
from collections.abc import Hashable
from typing import Protocol


class Sized(Protocol):
    """What the cache holds: anything that says its size (a numpy array, kept features)."""

    @property
    def nbytes(self) -> int: ...


class FeatureCache:
    """Features by key (a golden's id or its pictures' digest), at most ``max_bytes`` of them in all.

    A value larger than the whole bound is not kept (the caller still has it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Hashable, Sized] = OrderedDict()

    def get(self, key: Hashable) -> Sized | None:
        """The features kept under ``key`` (now the most recently used), or None."""
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
        return features

    def put(self, key: Hashable, features: Sized) -> None:
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
