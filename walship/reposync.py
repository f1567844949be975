"""Copy what one repository holds and another lacks: seeding a mirror, keeping an async one
current (``walship repo-sync``), and measuring how far behind a mirror is (``status``).

What is copied: the repository marker, every WAL, history, partial and backup-label file, and
every *complete* backup (one whose manifest the source holds): its parts first, its manifest
last, so a mirror never shows an incomplete backup as complete; the objects of an incomplete
backup are never copied. Nothing else (unknown keys) is touched, and nothing is ever deleted.

How: the two listings (sorted by key) are compared as they stream. Each missing object is
copied as it is stored (no re-encoding: the same bytes, the same metadata), through the
destination's create-only ``put``, so a killed copy leaves nothing partial and a rerun resumes
where it stopped; memory is one chunk in flight per object, whatever its size. Every object is
verified on the way: its stored bytes against its object digest (``walship_sha256``, no key
needed), or, for an object without one, decoded through the codec; a copy that fails is not
stored. An object that appears meanwhile in the destination (archiving, another repo-sync) is
fine; one that vanishes from the source meanwhile (``delete``) is skipped, and a backup that
lost a part is left without its manifest.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from walship import layout
from walship.backup import layout as backup_layout
from walship.codec import OBJECT_DIGEST_METADATA, Codec, ObjectDigest
from walship.errors import AlreadyExists, IntegrityError, NotFound
from walship.storage.base import ObjectInfo, Storage

READ_SIZE = 1 << 20


@dataclass(frozen=True)
class Plan:
    """The objects the destination lacks, in copy order (a backup's manifest after its
    parts), with the number of bytes and the oldest one's storage time."""

    objects: tuple[ObjectInfo, ...]
    bytes: int
    oldest: float | None  # POSIX seconds; None when nothing is missing (or unknown)

    def lag_seconds(self, now: float | None = None) -> float:
        if self.oldest is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self.oldest)


@dataclass
class SyncResult:
    """What one repo-sync did."""

    source: str
    destination: str
    copied: int = 0
    bytes: int = 0
    already: int = 0  # written meanwhile by someone else
    vanished: list[str] = field(default_factory=list)  # deleted from the source meanwhile
    damaged: list[str] = field(default_factory=list)  # failed verification: not copied
    seconds: float = 0.0


def _copyable(key: str) -> bool:
    return key == layout.MARKER_KEY or key.startswith(layout.WAL_PREFIX) \
        or backup_layout.split_key(key) is not None


def _missing(source: Storage, destination: Storage) -> Iterator[ObjectInfo]:
    """The source's copyable objects the destination lacks, in key order (a streaming merge of
    the two sorted listings)."""
    theirs = iter(destination.list(""))
    other = next(theirs, None)
    for info in source.list(""):
        if not _copyable(info.key):
            continue
        while other is not None and other.key < info.key:
            other = next(theirs, None)
        if other is None or other.key != info.key:
            yield info


def plan(source: Storage, destination: Storage) -> Plan:
    """What :func:`sync` would copy, in its order."""
    objects: list[ObjectInfo] = []
    backup: str | None = None
    held: list[ObjectInfo] = []  # the missing objects of the current backup
    manifest: ObjectInfo | None = None
    complete = False

    def close_backup() -> None:
        if complete:
            objects.extend(held)
            if manifest is not None:
                objects.append(manifest)

    # A backup's objects are consecutive in key order. Whether it is complete is known from
    # the source's full listing of it, so its missing objects are held until it ends.
    complete_in_source: set[str] = set()
    for info in source.list(backup_layout.BACKUP_PREFIX):
        split = backup_layout.split_key(info.key)
        if split is not None and split[1] == backup_layout.MANIFEST:
            complete_in_source.add(split[0])
    for info in _missing(source, destination):
        split = backup_layout.split_key(info.key)
        name = split[0] if split else None
        if name != backup:
            close_backup()
            backup, held, manifest = name, [], None
            complete = name in complete_in_source
        if split is None:
            objects.append(info)
        elif split[1] == backup_layout.MANIFEST:
            manifest = info
        else:
            held.append(info)
    close_backup()
    times = [info.modified for info in objects if info.modified is not None]
    return Plan(tuple(objects), sum(info.size for info in objects),
                min(times) if times else None)


def _verified(key: str, download: object, metadata: dict[str, str], codec: Codec | None,
              advance: Callable[[int], None]) -> Iterator[bytes]:
    """The stored bytes of ``download``, checked as they pass; raises before the last byte is
    handed on if they are not the object's (so the destination's put never completes)."""
    expected = metadata.get(OBJECT_DIGEST_METADATA)
    if key == layout.MARKER_KEY or (expected is None and codec is None):
        while chunk := download.read(READ_SIZE):  # type: ignore[attr-defined]
            advance(len(chunk))
            yield chunk
        return
    if expected is not None:
        digest = ObjectDigest(key)
        held = b""
        while chunk := download.read(READ_SIZE):  # type: ignore[attr-defined]
            digest.update(chunk)
            if held:
                yield held
            held = chunk
            advance(len(chunk))
        if not hmac.compare_digest(digest.hexdigest(), expected):
            raise IntegrityError(f"object {key} is damaged in the source repository",
                                 "its stored bytes do not match their digest; not copied",
                                 "restore it from another repository (repo-sync --from)")
        if held:
            yield held
        return
    pending: list[bytes] = []

    class _Recorder:
        def read(self, n: int = -1, /) -> bytes:
            data = download.read(n)  # type: ignore[attr-defined]
            pending.append(data)
            advance(len(data))
            return data

    assert codec is not None
    for _ in codec.decode(key, _Recorder(), metadata):
        if len(pending) > 1:
            yield from pending[:-1]
            del pending[:-1]
    yield from pending  # (after the decoder verified the whole object)


def copy_object(source: Storage, destination: Storage, info: ObjectInfo,
                codec: Codec | None = None,
                advance: Callable[[int], None] = lambda n: None) -> str:
    """Copy one object as it is stored: ``copied``, ``already`` (the destination got it
    meanwhile) or ``vanished`` (the source lost it meanwhile)."""
    try:
        download = source.get(info.key)
    except NotFound:
        return "vanished"
    with download:
        metadata = dict(download.info.metadata)
        try:
            stored = destination.put(info.key, _verified(info.key, download, metadata, codec,
                                                         advance),
                                     metadata=lambda: metadata)
        except AlreadyExists:
            return "already"
    if stored.size != download.info.size:
        raise IntegrityError(f"object {info.key} was copied with {stored.size} bytes",
                             f"the source holds {download.info.size}", "run repo-sync again")
    return "copied"


def _parts_present(source: Storage, destination: Storage, name: str) -> bool:
    """Whether the destination holds every object the source holds of backup ``name``
    (after its manifest was copied: a concurrent ``delete`` may have removed parts)."""
    prefix = backup_layout.backup_prefix(name)
    held = {info.key for info in destination.list(prefix)}
    return all(info.key in held for info in source.list(prefix))


def sync(source: Storage, destination: Storage, *, source_name: str = "source",
         destination_name: str = "destination", codec: Codec | None = None,
         progress: object | None = None, work: Plan | None = None) -> SyncResult:
    """Copy every object :func:`plan` finds missing, in its order; a backup whose part
    vanished meanwhile or failed verification is left without its manifest. The caller
    reports ``damaged`` objects (their keys) as the failure they are."""
    started = time.monotonic()
    work = work or plan(source, destination)
    result = SyncResult(source_name, destination_name)
    advance = getattr(progress, "advance", lambda n: None)
    if progress is not None:
        progress.start(work.bytes)  # type: ignore[attr-defined]
    broken: set[str] = set()
    try:
        for info in work.objects:
            split = backup_layout.split_key(info.key)
            if split is not None and split[0] in broken:
                continue
            try:
                outcome = copy_object(source, destination, info, codec, advance)
            except IntegrityError:
                result.damaged.append(info.key)  # (the others are still copied)
                if split is not None:
                    broken.add(split[0])
                continue
            if outcome == "copied" and split is not None \
                    and split[1] == backup_layout.MANIFEST \
                    and not _parts_present(source, destination, split[0]):
                # A delete removed parts meanwhile: the manifest just written would show an
                # incomplete backup as complete. It is ours: remove it again.
                destination.delete(info.key)
                outcome = "vanished"
            if outcome == "copied":
                result.copied += 1
                result.bytes += info.size
            elif outcome == "already":
                result.already += 1
            else:
                result.vanished.append(info.key)
                if split is not None:
                    broken.add(split[0])
    finally:
        if progress is not None:
            progress.finish()  # type: ignore[attr-defined]
    result.seconds = time.monotonic() - started
    return result


@dataclass(frozen=True)
class MirrorLag:
    """How far one mirror is behind the primary: the objects (and bytes) it lacks and the age
    of the oldest of them; ``reachable`` False (with ``reason``) when it could not be told."""

    name: str
    mode: str
    reachable: bool
    files: int | None = None
    bytes: int | None = None
    seconds: float | None = None
    reason: str = ""


def mirror_lags(storage: Storage, now: float | None = None) -> list[MirrorLag]:
    """The lag of every mirror of a mirrored ``storage`` (none for a single repository)."""
    from walship.errors import WalshipError

    members = getattr(storage, "members", None)
    if not members:
        return []
    lags = []
    for member in members[1:]:
        try:
            work = plan(members[0].storage, member.storage)
        except WalshipError as error:
            lags.append(MirrorLag(member.name, member.mode, False, reason=error.one_line()))
            continue
        lags.append(MirrorLag(member.name, member.mode, True, len(work.objects), work.bytes,
                              work.lag_seconds(now)))
    return lags
