"""The backups a repository holds: listing, reading and storing manifests, WAL coverage.

A backup is *complete* when its manifest exists (the commit point); only complete backups are
ever chosen for a restore. A backup whose parts exist without a manifest (a killed or failed
``backup-push``) is listed as incomplete, never as usable.

Chains: a differential or incremental backup depends on its parent (and its parent's parent,
up to a full backup) and reads some of its files from parts of older backups. Its chain is
*complete* when every ancestor has its manifest and every part it references is listed, with
the same key, size and digest, by the manifest of the backup that holds it;
:func:`chain_problem` says what is wrong otherwise. A backup whose chain is not complete is
never chosen nor restored.

WAL coverage: a backup can be made consistent only if every segment from its start segment to
its stop segment, on its timeline, is in the archive. :class:`WalIndex` answers that with one
LIST per timeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timezone
from typing import TypeVar

from walship import layout as wal_layout
from walship.archive import Archive
from walship.backup import layout
from walship.backup.manifest import Manifest, ManifestError
from walship.codec import Codec
from walship.errors import AlreadyExists, IntegrityError, NotFound, UsageError, WalshipError
from walship.storage.base import ObjectInfo, Storage

LATEST = "LATEST"
_T = TypeVar("_T")


@dataclass(frozen=True)
class BackupEntry:
    """One backup found in the repository; ``manifest`` is None when it is incomplete."""

    name: str
    manifest: Manifest | None
    parts: int
    stored_size: int

    @property
    def complete(self) -> bool:
        return self.manifest is not None


def store_manifest(archive: Archive, manifest: Manifest) -> ObjectInfo:
    """Write ``manifest`` (create-only): the backup becomes complete when this returns."""
    key = layout.manifest_key(manifest.name)
    data = manifest.to_json()
    stored = archive.codec.stored_form(key, [data], size_hint=len(data))
    try:
        return archive.storage.put(key, stored, metadata=stored.metadata)
    except AlreadyExists:
        raise IntegrityError(f"backup {manifest.name} already has a manifest",
                             "another backup-push used the same name",
                             "run backup-push again") from None


def load_manifest(archive: Archive, name: str) -> Manifest:
    """Read and verify the manifest of backup ``name``. NotFound if it has none. With
    mirrors, a copy that fails verification is read from the next repository, loudly."""
    try:
        return _load_manifest(archive.storage, archive.codec, name)
    except IntegrityError:
        if not hasattr(archive.storage, "members"):
            raise
        from walship.storage.mirrored import read_elsewhere

        return read_elsewhere(archive.storage,
                              lambda storage: _load_manifest(storage, archive.codec, name))


def _load_manifest(storage: Storage, codec: Codec, name: str) -> Manifest:
    return _parse_manifest(_read_manifest(storage, codec, name), name)


def _read_manifest(storage: Storage, codec: Codec, name: str) -> bytes:
    """The verified content of the manifest of backup ``name`` (NotFound if it has none)."""
    key = layout.manifest_key(name)
    with storage.get(key) as download:
        return b"".join(codec.decode(key, download, download.info.metadata))


def _parse_manifest(data: bytes, name: str) -> Manifest:
    """The manifest of backup ``name`` from its content (IntegrityError if it is not one)."""
    try:
        manifest = Manifest.from_json(data)
    except ManifestError as error:
        raise IntegrityError(f"the manifest of backup {name} is unreadable", str(error),
                             "is this walship older than the one that wrote it?") from None
    if manifest.name != name:
        raise IntegrityError(f"the manifest of backup {name} names backup {manifest.name}",
                             hint="the repository was tampered with")
    return manifest


def backup_objects(archive: Archive) -> dict[str, list[ObjectInfo]]:
    """Every object under ``backups/``, grouped by backup name (one LIST), oldest name first."""
    groups: dict[str, list[ObjectInfo]] = {}
    for info in archive.storage.list(layout.BACKUP_PREFIX):
        split = layout.split_key(info.key)
        if split is None:
            continue
        groups.setdefault(split[0], []).append(info)
    return {name: groups[name] for name in sorted(groups, key=layout.sort_key)}


def has_manifest(objects: Iterable[ObjectInfo]) -> bool:
    return any(info.key.endswith("/" + layout.MANIFEST) for info in objects)


MANIFEST_READERS = 8  # manifests read at once (a month of daily backups: 30 requests)


def _at_once(request: Callable[[str], _T], names: Sequence[str]) -> list[_T]:
    """``request(name)`` for each of ``names``, in order, :data:`MANIFEST_READERS` at a
    time (each is a request to the repository; one alone runs here)."""
    if len(names) <= 1:
        return [request(name) for name in names]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(MANIFEST_READERS, len(names)),
                            thread_name_prefix="walship-manifest") as pool:
        return list(pool.map(request, names))


def list_backups(archive: Archive) -> list[BackupEntry]:
    """Every backup in the repository, oldest first, complete or not. The manifests are read
    :data:`MANIFEST_READERS` at a time (each is one request, and most commands, backup-push's
    choice of a parent among them, read them all)."""
    groups = backup_objects(archive)
    with_manifest = [name for name, objects in groups.items() if has_manifest(objects)]
    loaded = dict(zip(with_manifest, _at_once(lambda name: load_manifest(archive, name),
                                              with_manifest), strict=True))
    entries = []
    for name, objects in groups.items():
        parts = [info for info in objects
                 if layout.part_number(info.key.rsplit("/", 1)[1]) is not None]
        entries.append(BackupEntry(name, loaded.get(name), len(parts),
                                   sum(i.size for i in parts)))
    return entries


def newest_chain(archive: Archive, accept: Callable[[Manifest], bool] = lambda _: True
                 ) -> list[Manifest]:
    """The newest complete backup (by name: its start time) that ``accept`` takes and whose
    chain is complete, then its ancestors, parent first; [] if there is none. The manifests
    are read newest first, only as far back as needed (the newest :data:`MANIFEST_READERS` at
    once, then one at a time), and parsed only as far as needed: a month of backups is not
    read to find yesterday's, as :func:`list_backups` then :func:`usable_chains` would."""
    names = [name for name, objects in backup_objects(archive).items()
             if has_manifest(objects) and layout.is_backup_name(name)][::-1]
    loaded: dict[str, Manifest | None] = {}
    fetched: dict[str, bytes] = {}

    def fetch(name: str) -> None:
        try:
            fetched[name] = _read_manifest(archive.storage, archive.codec, name)
        except (WalshipError, OSError):
            pass  # (read again, and reported, by load_manifest if it is needed)

    def find(name: str) -> Manifest | None:
        if name not in loaded:
            data = fetched.pop(name, None)
            try:
                if not layout.is_backup_name(name):
                    loaded[name] = None
                elif data is None:
                    loaded[name] = load_manifest(archive, name)
                else:
                    try:
                        loaded[name] = _parse_manifest(data, name)
                    except IntegrityError:  # (with mirrors: another copy)
                        loaded[name] = load_manifest(archive, name)
            except NotFound:
                loaded[name] = None
        return loaded[name]

    # The newest few are read at once, but each is parsed only when needed: an incr's parent
    # is the newest backup, and parsing a manifest (about 5 ms for 1,000 files) is CPU that
    # the backup waits for.
    _at_once(fetch, names[:MANIFEST_READERS])
    for name in names:
        manifest = find(name)
        if manifest is None or not accept(manifest) or chain_problem(manifest, find):
            continue
        chain = [manifest]
        while chain[-1].parent is not None:
            chain.append(loaded[chain[-1].parent])  # type: ignore[arg-type]
        return chain
    return []


def chain_problem(manifest: Manifest, find: Callable[[str], Manifest | None]) -> str | None:
    """Why the chain of ``manifest`` is not complete (see the module docstring), or None.
    ``find(name)`` is the complete backup ``name``'s manifest, None if it has none."""
    ancestors: dict[str, Manifest] = {}
    current = manifest
    while current.parent is not None:
        name = current.parent
        if name in ancestors or name == manifest.name:
            return f"its chain of parents loops at {name}"
        parent = find(name)
        if parent is None:
            return f"its parent {name} is missing or incomplete (no manifest)"
        if parent.system_identifier != manifest.system_identifier:
            return f"its parent {name} comes from another cluster"
        ancestors[name] = parent
        current = parent
    for part in manifest.referenced_parts:
        holder = ancestors.get(part.backup)
        if holder is None:
            return f"it references part {part.number} of {part.backup}, not one of its parents"
        own = next((p for p in holder.parts if p.number == part.number), None)
        if own is None or (own.key, own.size, own.stored_size, own.digest) != (
                part.key, part.size, part.stored_size, part.digest):
            return f"part {part.number} of {part.backup} is not the one it references"
    return None


def usable_chains(manifests: Iterable[Manifest]) -> list[Manifest]:
    """The manifests (of complete backups) whose chain is complete, in the given order."""
    every = list(manifests)
    by_name = {m.name: m for m in every}
    return [m for m in every if chain_problem(m, by_name.get) is None]


def check_chain(archive: Archive, manifest: Manifest) -> None:
    """Raise IntegrityError unless the chain of ``manifest`` is complete (its ancestors'
    manifests are read from the repository)."""
    if manifest.parent is None and not manifest.referenced_parts:
        return

    def find(name: str) -> Manifest | None:
        if not layout.is_backup_name(name):
            return None
        try:
            return load_manifest(archive, name)
        except NotFound:
            return None

    problem = chain_problem(manifest, find)
    if problem is not None:
        raise IntegrityError(f"backup {manifest.name} ({manifest.backup_type}) cannot be "
                             "restored: its chain is not complete", problem,
                             "restore an older complete backup, or take a full backup")


def chain_gone(archive: Archive, manifest: Manifest, chain: Sequence[Manifest]) -> str | None:
    """Why the chain of ``manifest`` is no longer complete, or None, from one HEAD of each
    ancestor's manifest (at once): ``chain`` holds its ancestors' manifests, read and found
    complete (:func:`chain_problem`) before. A manifest is never rewritten and ``delete``
    removes a backup's manifest first, so such a chain stays complete while each of its
    manifests is there. (backup-push asks this once its manifest is written, of a chain a
    delete may have been removing meanwhile. Reading every manifest again took 0.3 s for a
    chain of 30; listing the repository grows with it.)"""
    by_name = {m.name: m for m in chain}
    names: list[str] = []
    name = manifest.parent
    while name is not None:
        ancestor = by_name.get(name)
        if ancestor is None or name in names:
            return f"its ancestor {name} was not among those read"
        names.append(name)
        name = ancestor.parent

    def there(name: str) -> bool:
        try:
            archive.storage.head(layout.manifest_key(name))
        except NotFound:
            return False
        return True

    for name, present in zip(names, _at_once(there, names), strict=True):
        if not present:
            return f"its ancestor {name} is missing or incomplete (no manifest)"
    return None


def name_taken(archive: Archive, name: str) -> bool:
    for _ in archive.storage.list(layout.backup_prefix(name), limit=1):
        return True
    return False


def resolve(archive: Archive, name: str) -> Manifest:
    """The manifest of backup ``name``, or of the newest complete backup for ``LATEST``."""
    if name.upper() == LATEST:
        complete = usable_chains(e.manifest for e in list_backups(archive) if e.manifest)
        if not complete:
            raise NotFound(f"the repository {archive.storage.url} holds no complete backup",
                           hint="run walship backup-push first")
        return max(complete, key=lambda m: (m.start_time, layout.sort_key(m.name)))
    if not layout.is_backup_name(name):
        raise UsageError(f"{name!r} is not a backup name",
                         "names look like 20261125T020000Z", "see walship backup-list")
    try:
        return load_manifest(archive, name)
    except NotFound:
        if name_taken(archive, name):
            raise NotFound(f"backup {name} is incomplete", "it has no manifest (its "
                           "backup-push failed or was killed)", "use another backup") from None
        raise NotFound(f"backup {name} does not exist in {archive.storage.url}",
                       hint="see walship backup-list") from None


class WalIndex:
    """Which WAL segments the archive holds, listed once per timeline and remembered."""

    def __init__(self, archive: Archive) -> None:
        self._archive = archive
        self._timelines: dict[int, set[str]] = {}

    def names(self, timeline: int) -> set[str]:
        if timeline not in self._timelines:
            prefix = wal_layout.wal_key(f"{timeline:08X}")
            self._timelines[timeline] = {wal_layout.wal_name(info.key)
                                         for info in self._archive.storage.list(prefix)}
        return self._timelines[timeline]

    def missing(self, manifest: Manifest) -> list[str]:
        """The segments ``manifest`` needs that the archive lacks (empty: WAL complete)."""
        present = self.names(manifest.timeline)
        return [name for name in manifest.needed_wal() if name not in present]


def describe_missing(missing: Iterable[str]) -> str:
    names = list(missing)
    if not names:
        return "none"
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def summary(entry: BackupEntry, index: WalIndex,
            others: Mapping[str, Manifest] | None = None) -> dict[str, object]:
    """One backup as the plain values ``backup-list`` shows (and prints as JSON); ``others``
    holds the complete backups' manifests by name, to check the backup's chain."""
    manifest = entry.manifest
    if manifest is None:
        return {"name": entry.name, "complete": False, "usable": False, "parts": entry.parts,
                "stored_size": entry.stored_size, "stored_bytes": entry.stored_size}
    missing = index.missing(manifest)
    problem = chain_problem(manifest, (others or {}).get)
    return {
        "name": manifest.name, "complete": True, "usable": not missing and problem is None,
        "type": manifest.backup_type, "parent": manifest.parent,
        "chain_complete": problem is None, "chain_problem": problem,
        "logical_bytes": manifest.size, "stored_bytes": manifest.stored_size,
        "references": list(manifest.referenced_backups),
        "start_time": manifest.start_time.astimezone(timezone.utc).isoformat(),
        "stop_time": manifest.stop_time.astimezone(timezone.utc).isoformat(),
        "duration": round(manifest.duration, 3),
        "start_lsn": str(manifest.start_lsn), "stop_lsn": str(manifest.stop_lsn),
        "timeline": manifest.timeline, "start_wal": manifest.start_wal,
        "stop_wal": manifest.stop_wal, "wal_complete": not missing,
        "wal_missing": missing[:20], "size": manifest.size,
        "stored_size": manifest.stored_size, "files": len(manifest.files),
        "parts": len(manifest.parts), "pg_version": manifest.pg_version,
        "system_identifier": manifest.system_identifier,
        "from_standby": manifest.from_standby,
        "tablespaces": [{"oid": t.oid, "name": t.name, "location": t.location}
                        for t in manifest.tablespaces],
    }
