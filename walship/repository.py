"""The repository marker (``walship.json``): one repository, one key, one segment size.

A repository holds the objects of one cluster written one way: all encrypted with one key, or
all unencrypted, and WAL segments of one size. The marker records which, so that a push that
would mix them (a second server with another key or none, a cluster with another
``wal_segment_size``) is refused *before it stores anything*, with exit 3
(:class:`~walship.errors.RepositoryMismatch`), instead of storing objects that a restore
later refuses or cannot use.

The marker is a small JSON object, readable without the key (a key id reveals nothing about
the key)::

    {"walship": "repository", "layout": 1, "encryption": "aes-256-gcm",
     "key_id": "0123456789abcdef", "wal_segment_size": 16777216}

(``"encryption": "none"`` and ``"key_id": null`` for an unencrypted repository.)

Promises:

* The marker is written create-only, before the first object that depends on it: of two
  servers pushing their first segment at once, one writes it and the other reads it and is
  judged by it. It is never rewritten.
* A repository written before the marker existed gets one at its next push, from what is
  stored: the key id in the header of a stored object, the size of a stored segment (decoded,
  once) or the segment size in a backup manifest. If what is stored disagrees with the
  pushing server, the push is refused and no marker is written.
* A fresh repository whose first object is not a segment (a ``.history`` or ``.backup`` file)
  gets its marker with the first segment; until then the key is judged by the stored objects.
* The hot path pays no round trip for this: a verdict, once the marker agrees, is remembered in
  the spool directory beside pg_wal (``pg_wal/walship/repository``), valid for the same
  configuration (settings fingerprint), repository URL and key id, and for
  :data:`VERDICT_SECONDS`; then the marker is read again (one small GET).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from walship import layout, spool, wal
from walship.errors import (AlreadyExists, IntegrityError, NotFound, RepositoryMismatch,
                            WalshipError)

if TYPE_CHECKING:
    from walship.codec import Codec
    from walship.storage.base import Storage

MARKER_TAG = "repository"
VERDICT_FILE = "repository"
VERDICT_SECONDS = 600.0
MAX_MARKER_BYTES = 64 << 10
SCAN_LIMIT = 1000  # objects listed, at most, to find a stored segment or manifest


@dataclass(frozen=True)
class Identity:
    """How a repository's objects are written: ``key_id`` None means unencrypted;
    ``segment_size`` None only while no segment is known (never in a marker)."""

    key_id: bytes | None
    segment_size: int | None

    def to_json(self) -> bytes:
        return json.dumps({
            "walship": MARKER_TAG, "layout": layout.LAYOUT_VERSION,
            "encryption": "aes-256-gcm" if self.key_id else "none",
            "key_id": self.key_id.hex() if self.key_id else None,
            "wal_segment_size": self.segment_size}, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Identity:
        """Parse a marker; :class:`IntegrityError` if it is not one this walship can read."""
        def bad(why: str) -> IntegrityError:
            return IntegrityError(f"the repository marker {where} is unreadable", why,
                                  "restore it, or delete it: the next push writes it again "
                                  "from what the repository holds")
        try:
            fields = json.loads(data)
        except ValueError as error:
            raise bad(f"not JSON ({error})") from None
        if not isinstance(fields, dict) or fields.get("walship") != MARKER_TAG:
            raise bad("not a walship repository marker")
        version = fields.get("layout")
        if not isinstance(version, int) or version < 1:
            raise bad(f"invalid layout {version!r}")
        if version > layout.LAYOUT_VERSION:
            raise IntegrityError(f"the repository {where} has layout version {version}",
                                 f"this walship writes version {layout.LAYOUT_VERSION}",
                                 "upgrade walship")
        key_id = fields.get("key_id")
        size = fields.get("wal_segment_size")
        try:
            key = bytes.fromhex(key_id) if key_id is not None else None
            if key is not None and len(key) != 8 or not isinstance(size, int):
                raise ValueError
            wal.check_segment_size(size)
        except (TypeError, ValueError):
            raise bad(f"invalid key id {key_id!r} or segment size {size!r}") from None
        if (fields.get("encryption") == "none") != (key is None):
            raise bad("its encryption and key id disagree")
        return cls(key, size)


def describe(key_id: bytes | None) -> str:
    return f"encrypted, key id {key_id.hex()}" if key_id else "not encrypted"


class RepositoryGuard:
    """Checks, before a push stores anything, that the repository is written with this codec's
    key (or none) and holds segments of this size; creates the marker where it is missing.
    One per :class:`~walship.archive.Archive`; thread-safe; the repository's identity is
    established once per process at most."""

    def __init__(self, storage: Storage, codec: Codec) -> None:
        self.storage = storage
        self.codec = codec
        self._lock = threading.Lock()
        self._identity: Identity | None = None  # from a marker that agrees with this codec
        self.marker_reads = 0  # round trips spent on the marker (for tests and measurements)

    @property
    def key_id(self) -> bytes | None:
        return self.codec.key.key_id if self.codec.key else None

    def check(self, segment_size: int | None = None, *, wal_dir: str | None = None,
              name: str = "") -> None:
        """Raise :class:`RepositoryMismatch` unless this codec, and a segment of
        ``segment_size`` bytes (None: not a segment), belong in this repository. ``wal_dir``:
        where to remember the verdict (``pg_wal``), so that later calls need no round trip."""
        with self._lock:
            source = "its marker walship.json"
            identity = self._identity or self._remembered(wal_dir)
            durable = identity is not None
            if identity is None:
                identity, source, durable = self._establish(segment_size)
                self._judge(identity, source, segment_size, name)  # before it is remembered
                if durable:
                    self._remember(wal_dir, identity)
            self._judge(identity, source, segment_size, name)
            if durable:
                self._identity = identity

    # -- judging ----------------------------------------------------------------------------
    def _judge(self, identity: Identity, source: str, segment_size: int | None,
               name: str) -> None:
        url = self.storage.url
        ours = self.key_id
        if identity.key_id != ours:
            if ours is None:
                theirs = identity.key_id.hex() if identity.key_id else ""
                what = (f"the repository {url} is encrypted (key id {theirs}) and no "
                        "encryption key is configured")
                hint = "configure the key with that id (WALSHIP_ENCRYPTION_KEY_FILE)"
            elif identity.key_id is None:
                what = (f"the repository {url} is not encrypted and an encryption key is "
                        f"configured (key id {ours.hex()})")
                hint = "unset the key for this repository, or use another repository"
            else:
                what = (f"the repository {url} is encrypted with another key: key id "
                        f"{identity.key_id.hex()}, the configured key's is {ours.hex()}")
                hint = "configure the key the repository was written with"
            raise RepositoryMismatch(what, f"one repository, one key (according to {source}); "
                                     "nothing was stored", hint + ", or give each cluster "
                                     "its own repository")
        if (segment_size is not None and identity.segment_size is not None
                and segment_size != identity.segment_size):
            subject = f"WAL segment {name} has" if name else "this cluster's WAL segments have"
            raise RepositoryMismatch(
                f"{subject} {segment_size} bytes and the repository {url} holds "
                f"segments of {identity.segment_size} bytes", f"one repository holds one "
                f"cluster's WAL (according to {source}); nothing was stored", "is another cluster "
                "archiving into this repository? Give each cluster its own repository")

    # -- the marker -------------------------------------------------------------------------
    def _establish(self, segment_size: int | None) -> tuple[Identity, str, bool]:
        """The repository's identity, where it came from, and whether it is the marker's
        (durable); writes the marker when it is missing and everything it records is known
        and agrees with this codec."""
        marker = self.read_marker()
        if marker is not None:
            return marker, "its marker walship.json", True
        stored = self._derive()
        ours = self.key_id
        if stored is not None and stored.key_id != ours:
            return stored, "the objects it holds", False
        size = stored.segment_size if stored and stored.segment_size else segment_size
        identity = Identity(ours, size)
        if size is None:  # nothing says the segment size yet: the first segment will
            return identity, "the objects it holds", False
        try:
            self.storage.put(layout.MARKER_KEY, [identity.to_json()])
        except AlreadyExists:  # another server wrote it first: it decides
            marker = self.read_marker()
            if marker is None:
                raise IntegrityError(f"the repository marker of {self.storage.url} vanished",
                                     "it was deleted while this push read it") from None
            return marker, "its marker walship.json", True
        return identity, ("its marker walship.json, written now from " +
                          ("the objects it holds" if stored else "this first push")), True

    def read_marker(self) -> Identity | None:
        """The marker's identity; None if the repository has none."""
        self.marker_reads += 1
        try:
            with self.storage.get(layout.MARKER_KEY) as download:
                data = b""
                while len(data) <= MAX_MARKER_BYTES and (chunk := download.read(1 << 16)):
                    data += chunk
        except NotFound:
            return None
        if len(data) > MAX_MARKER_BYTES:
            raise IntegrityError(f"the repository marker {self.storage.url}/"
                                 f"{layout.MARKER_KEY} is unreadable", "it is too large")
        return Identity.from_json(data, f"{self.storage.url}/{layout.MARKER_KEY}")

    def _derive(self) -> Identity | None:
        """The identity of what a repository without a marker holds (None: it holds nothing
        walship wrote): the key id from a stored object's header; the segment size from a
        stored segment, decoded (only when it is this codec's key), else from a manifest."""
        key_id: bytes | None = None
        known = False
        size = None
        segments = []
        peeks = 3  # objects whose header is unreadable are skipped, a few of them
        for info in self.storage.list(layout.WAL_PREFIX, limit=SCAN_LIMIT):
            try:
                kind = wal.parse_name(layout.wal_name(info.key)).kind
            except ValueError:
                continue
            if not known and peeks > 0:
                peeks -= 1
                peeked = self._peek_key(info.key)
                if peeked is not None:
                    key_id, known = peeked[0], True
            if kind is wal.FileKind.SEGMENT:
                segments.append(info.key)
                if known:
                    break
        if known and key_id != self.key_id:
            return Identity(key_id, None)
        for key in segments[:1]:
            size = self._segment_size(key)
        if size is None:
            manifest_key_id, size, found = self._from_manifest()
            if found and not known:
                key_id, known = manifest_key_id, True
        if not known:
            return None
        return Identity(key_id, size)

    def _peek_key(self, key: str) -> tuple[bytes | None] | None:
        """(key id or None) from the header of the stored object ``key``; None if unreadable."""
        from walship.codec.header import Header

        try:
            with self.storage.get(key) as download:
                header = Header.read(download, key)
        except (NotFound, IntegrityError):
            return None
        return (header.key_id if header.encrypted else None,)

    def _segment_size(self, key: str) -> int | None:
        """The plaintext size of the stored segment ``key`` (decoded in full, verified)."""
        size = 0
        try:
            with self.storage.get(key) as download:
                for chunk in self.codec.decode(key, download, download.info.metadata):
                    size += len(chunk)
            return wal.check_segment_size(size)
        except (NotFound, IntegrityError, ValueError):
            return None

    def _from_manifest(self) -> tuple[bytes | None, int | None, bool]:
        """(key id, segment size, whether a manifest was read) from a stored backup manifest;
        the size only when the manifest is written with this codec's key."""
        from walship.backup import layout as backup_layout
        from walship.backup.manifest import Manifest, ManifestError

        for info in self.storage.list(backup_layout.BACKUP_PREFIX, limit=SCAN_LIMIT):
            if not info.key.endswith("/" + backup_layout.MANIFEST):
                continue
            peeked = self._peek_key(info.key)
            if peeked is None:
                continue
            if peeked[0] != self.key_id:
                return peeked[0], None, True
            try:
                with self.storage.get(info.key) as download:
                    data = b"".join(self.codec.decode(info.key, download,
                                                      download.info.metadata))
                return peeked[0], Manifest.from_json(data).wal_segment_size, True
            except (WalshipError, ManifestError):
                return peeked[0], None, True
        return None, None, False

    # -- the remembered verdict -------------------------------------------------------------
    def _verdict_tag(self) -> str:
        ours = self.key_id.hex() if self.key_id else "plain"
        text = f"{spool.settings_fingerprint()}\0{self.storage.url}\0{ours}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _remembered(self, wal_dir: str | None) -> Identity | None:
        if wal_dir is None or not spool.safe_dir(wal_dir, spool.spool_dir(wal_dir)):
            return None  # (a spool that is not this user's own proves nothing)
        path = os.path.join(spool.spool_dir(wal_dir), VERDICT_FILE)
        try:
            if time.time() - os.stat(path).st_mtime > VERDICT_SECONDS:
                return None
        except OSError:
            return None
        fields = (spool.read_text(path) or "").split()
        if len(fields) != 3 or fields[0] != self._verdict_tag():
            return None
        try:
            key_id = None if fields[1] == "plain" else bytes.fromhex(fields[1])
            return Identity(key_id, wal.check_segment_size(int(fields[2])))
        except ValueError:
            return None

    def _remember(self, wal_dir: str | None, identity: Identity) -> None:
        """Best effort: a verdict that cannot be written costs later calls one GET each."""
        if wal_dir is None or identity.segment_size is None:
            return
        root = spool.spool_dir(wal_dir)
        # (only where the spool may be used: pg_wal and the spool are this user's and nobody
        # else's, no link on the way; so root running a push by hand in the postgres user's
        # pg_wal leaves nothing there)
        if not spool.safe_dir(wal_dir, root, create=True):
            return
        try:
            key = identity.key_id.hex() if identity.key_id else "plain"
            spool.write_atomically(os.path.join(root, VERDICT_FILE),
                                   f"{self._verdict_tag()} {key} {identity.segment_size}\n")
        except OSError:
            pass
