"""In-memory backend (``memory://``): the reference implementation of the storage contract.

Used by unit tests and as the executable specification of :mod:`walship.storage.base`. Objects
live in a process-wide dictionary per repository name, guarded by a lock; nothing is durable
beyond the process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

from walship.errors import AlreadyExists, NotFound
from walship.storage.base import (BytesDownload, MetadataSource, ObjectInfo, check_key,
                                  check_metadata)

_REPOSITORIES: dict[str, dict[str, tuple[bytes, dict[str, str], float]]] = {}
_LOCK = threading.Lock()


class MemoryStorage:
    """A dictionary of objects, shared by every ``MemoryStorage`` opened on the same URL."""

    def __init__(self, url: str = "memory://default") -> None:
        self.url = url
        with _LOCK:
            self._objects = _REPOSITORIES.setdefault(url, {})

    def put(self, key: str, data: Iterable[bytes], *,
            metadata: MetadataSource | None = None) -> ObjectInfo:
        check_key(key)
        if key in self._objects:  # fail early; checked again under the lock below
            raise AlreadyExists(f"object {key} already exists in {self.url}")
        body = b"".join(data)
        meta = dict(check_metadata(metadata() if metadata else {}))
        with _LOCK:
            if key in self._objects:
                raise AlreadyExists(f"object {key} already exists in {self.url}")
            self._objects[key] = (body, meta, time.time())
        return ObjectInfo(key, len(body), meta)

    def _lookup(self, key: str) -> tuple[bytes, dict[str, str], float]:
        with _LOCK:
            found = self._objects.get(check_key(key))
        if found is None:
            raise NotFound(f"object {key} not found in {self.url}")
        return found

    def get(self, key: str) -> BytesDownload:
        body, meta, modified = self._lookup(key)
        return BytesDownload(ObjectInfo(key, len(body), dict(meta), modified), body)

    def head(self, key: str) -> ObjectInfo:
        body, meta, modified = self._lookup(key)
        return ObjectInfo(key, len(body), dict(meta), modified)

    def list(self, prefix: str = "", *, limit: int | None = None) -> Iterator[ObjectInfo]:
        with _LOCK:
            items = sorted((k, v) for k, v in self._objects.items() if k.startswith(prefix))
        if limit is not None:
            items = items[:max(0, limit)]
        for key, (body, meta, modified) in items:
            yield ObjectInfo(key, len(body), dict(meta), modified)

    def delete(self, key: str) -> None:
        with _LOCK:
            self._objects.pop(check_key(key), None)

    def close(self) -> None:
        pass

    # Test helpers: reach behind the protocol to damage stored objects.
    def replace_raw(self, key: str, body: bytes) -> None:
        """Overwrite an object's bytes in place, keeping its metadata (tamper tests only)."""
        with _LOCK:
            _, meta, modified = self._objects[key]
            self._objects[key] = (body, meta, modified)

    def set_modified(self, key: str, modified: float) -> None:
        """Pretend an object was stored at ``modified`` (retention tests only)."""
        with _LOCK:
            body, meta, _ = self._objects[key]
            self._objects[key] = (body, meta, modified)

    @staticmethod
    def forget(url: str) -> None:
        """Drop a whole in-memory repository."""
        with _LOCK:
            _REPOSITORIES.pop(url, None)
