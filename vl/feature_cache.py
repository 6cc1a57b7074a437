"""A bounded LRU cache of vision features, keyed by image content and preprocessing settings.

Thread-safe (worker threads look up, the event loop stores). Bounded in bytes: storing
past the bound evicts the least recently used entries; an entry larger than the whole
bound is not stored. ``image_cache_key`` makes the keys.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.prompt import ImageFeatures

if TYPE_CHECKING:
    from vl.image_source import EncodedImage


def image_cache_key(image: EncodedImage, settings_key: str) -> str:
    """The feature-cache key of an image: its bytes, their encoding and the preprocessor
    settings. Hashing releases the GIL for payloads of more than 2 KiB."""
    return f"{hashlib.sha256(image.payload).hexdigest()}:{int(image.base64_encoded)}:{settings_key}"


@dataclass(frozen=True)
class FeatureCacheStatistics:
    entries: int
    bytes_cached: int
    capacity_bytes: int
    hits: int
    misses: int


class FeatureCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: collections.OrderedDict[str, ImageFeatures] = collections.OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    @staticmethod
    def _size(features: ImageFeatures) -> int:
        return features.embeddings.numel() * features.embeddings.element_size()

    def get(self, key: str) -> ImageFeatures | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return found

    def put(self, key: str, features: ImageFeatures) -> None:
        size = self._size(features)
        if size > self.capacity_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= self._size(old)
            self._entries[key] = features
            self._bytes += size
            while self._bytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= self._size(evicted)

    def statistics(self) -> FeatureCacheStatistics:
        with self._lock:
            return FeatureCacheStatistics(
                len(self._entries), self._bytes, self.capacity_bytes, self._hits, self._misses
            )
