"""The storage protocol: the five operations every repository backend provides, and their contract.

A backend stores opaque objects under string keys. It knows nothing of WAL, backups, compression
or encryption. Keys are relative, ``/``-separated, made of ``[A-Za-z0-9._-]`` segments, never
empty, never starting with ``.`` in any segment (backends may use dot-names for their own
temporary files) and never ``..``. Metadata is a small ``str -> str`` mapping whose keys are
lower-case identifiers (``[a-z][a-z0-9_]*``), stored with the object and returned by ``head``,
``get`` and ``list``.

Errors are walship's own, translated at the backend boundary (see :mod:`walship.errors`):

* :class:`~walship.errors.NotFound`: the storage *authoritatively* says the key does not exist.
  A backend must never raise it for "could not tell" (a timeout, a missing mount, a missing
  container): that is :class:`~walship.errors.Unavailable` or
  :class:`~walship.errors.RepositoryMissing`.
* :class:`~walship.errors.AlreadyExists`: a create-only ``put`` found the key taken.
* :class:`~walship.errors.Unavailable`: transient failures persisted past the retry budget.
  Retries live inside backends and nowhere else.
* :class:`~walship.errors.StorageError`: a permanent failure (permissions, authentication).

A backend that waits on the network keeps to :func:`effective_deadline`: its own deadline
(:attr:`walship.storage.StorageOptions.deadline`), or an earlier one the calling thread set
with :func:`time_share` (a mirrored read gives each repository a share of the call's time).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from walship.errors import UsageError

KEY_PATTERN = re.compile(r"(?!.*(?:^|/)\.)[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
METADATA_KEY_PATTERN = re.compile(r"[a-z][a-z0-9_]*")


_share = threading.local()


@contextmanager
def time_share(until: float | None) -> Iterator[None]:
    """Within the block, this thread's storage requests end by ``until`` (a
    :func:`time.monotonic` instant) at the latest, retries and back-offs included, as if it
    were their deadline; None: no further bound. Nests (the earliest bound wins)."""
    previous = getattr(_share, "until", None)
    if until is not None and previous is not None:
        until = min(until, previous)
    _share.until = until if until is not None else previous
    try:
        yield
    finally:
        _share.until = previous


def effective_deadline(deadline: float | None) -> float | None:
    """``deadline``, or this thread's :func:`time_share` bound when that is earlier."""
    until = getattr(_share, "until", None)
    if until is None:
        return deadline
    return until if deadline is None else min(deadline, until)


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise :class:`UsageError`."""
    if not KEY_PATTERN.fullmatch(key) or ".." in key.split("/"):
        raise UsageError(f"invalid object key {key!r}", "keys are /-separated [A-Za-z0-9._-] "
                         "segments that do not start with a dot")
    return key


def check_metadata(metadata: Mapping[str, str]) -> Mapping[str, str]:
    """Return ``metadata`` if every key and value is storable by every backend."""
    for name, value in metadata.items():
        if not METADATA_KEY_PATTERN.fullmatch(name) or not value.isascii() or "\n" in value:
            raise UsageError(f"invalid metadata {name!r}", "metadata keys are lower-case "
                             "identifiers and values single-line ASCII")
    return metadata


@dataclass(frozen=True)
class ObjectInfo:
    """What a backend knows of one stored object.

    ``modified`` is when the object was stored (it is never rewritten), in POSIX seconds (UTC),
    as the storage's clock saw it: the file's mtime, the blob's Last-Modified, the time of the
    put in memory. ``head``, ``get`` and ``list`` fill it; ``put`` may leave it None. Its
    resolution is the backend's (whole seconds for Azure). It is None only when the backend
    cannot tell.
    """

    key: str
    size: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    modified: float | None = None


class Download(Protocol):
    """An open, streaming read of one object (returned by :meth:`Storage.get`).

    ``info`` describes the object being read (its metadata included, so no separate ``head`` is
    needed). ``read(n)`` returns at most ``n`` bytes and ``b""`` only at the end; a short or
    failed transfer raises (:class:`~walship.errors.Unavailable` or
    :class:`~walship.errors.IntegrityError`), it never silently ends early. ``close`` releases
    the connection or file; a download is also a context manager.
    """

    info: ObjectInfo

    def read(self, n: int = -1) -> bytes: ...

    def close(self) -> None: ...

    def __enter__(self) -> Download: ...

    def __exit__(self, *exc: object) -> None: ...


MetadataSource = Callable[[], Mapping[str, str]]


@runtime_checkable
class Storage(Protocol):
    """A repository backend. Implementations: memory, file (``file://``), Azure (``azure://``)."""

    url: str  # where the repository lives, with no secret in it

    def put(self, key: str, data: Iterable[bytes], *,
            metadata: MetadataSource | None = None) -> ObjectInfo:
        """Store the concatenation of ``data`` under ``key`` if, and only if, ``key`` is absent.

        ``metadata`` is called once, after ``data`` is exhausted and before the object becomes
        visible, so a caller may compute it (a digest) while the data streams.

        On return the object is durable: a crash of this process, of the machine or of the
        storage service cannot lose it. While ``put`` runs, and after it fails or the process is
        killed, no reader ever sees a partial object under ``key``: the key is either absent or
        holds the complete object with its metadata.

        Raises :class:`~walship.errors.AlreadyExists` if ``key`` is taken, leaving the stored
        object untouched (the new data may have been consumed). Memory use is bounded whatever
        the object's size.
        """
        ...

    def get(self, key: str) -> Download:
        """Open ``key`` for a streaming read. Raises :class:`~walship.errors.NotFound`."""
        ...

    def head(self, key: str) -> ObjectInfo:
        """Describe ``key`` without reading it (size, metadata, ``modified``). Raises
        :class:`~walship.errors.NotFound`."""
        ...

    def list(self, prefix: str = "", *, limit: int | None = None) -> Iterator[ObjectInfo]:
        """Yield every complete object whose key starts with ``prefix``, sorted by key, with
        its size, metadata and ``modified`` time; only the first ``limit`` of them when
        ``limit`` is given, which the backend asks its service for and no more (a check for
        "any object under this prefix" is one small request, whatever the prefix holds).

        Objects being written (not yet visible to ``get``) are never listed.
        """
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``. Deleting an absent key is not an error (deletes are idempotent)."""
        ...

    def close(self) -> None:
        """Release connections and pools. The backend is not used afterwards."""
        ...


class BytesDownload:
    """A :class:`Download` over bytes already in memory (small objects, the memory backend)."""

    def __init__(self, info: ObjectInfo, data: bytes) -> None:
        self.info = info
        self._data = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n is None or n < 0 else min(len(self._data), self._pos + n)
        chunk = self._data[self._pos:end].tobytes()
        self._pos = end
        return chunk

    def close(self) -> None:
        self._data = memoryview(b"")

    def __enter__(self) -> BytesDownload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
