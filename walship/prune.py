"""``walship delete``: list the repository, plan with :mod:`walship.retention`, delete in order.

The policy is pure and lives in :mod:`walship.retention`; this module does the I/O around it:

1. one LIST of ``backups/`` (each complete backup's manifest read for its times and start
   segment) and one LIST of ``wal/``, with every object's ``modified`` time;
2. the plan;
3. unless it is a dry run, the deletions, in an order that is safe at every step should the
   process die: each doomed complete backup loses its MANIFEST FIRST (from then on it lists as
   incomplete and is never offered for a restore), then its parts; then doomed incomplete
   backups; then WAL, lowest position first (what remains is always a contiguous tail).

It runs safely beside ``wal-push`` (which only adds segments, at the end of WAL) and
``backup-push`` (see the in-progress rules in :mod:`walship.retention`): it never deletes what
the plan keeps, and the plan never depends on an object appearing or not after the listing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from walship import layout as wal_layout
from walship.archive import Archive
from walship.backup import catalog
from walship.backup import layout as backup_layout
from walship.errors import NotFound
from walship.retention import BackupSummary, Plan, Policy, plan, summary_of_incomplete
from walship.storage.base import ObjectInfo

Log = Callable[[str], None]


@dataclass(frozen=True)
class Inventory:
    """What the repository holds, as the policy needs it."""

    backups: tuple[BackupSummary, ...]
    wal: tuple[ObjectInfo, ...]


@dataclass(frozen=True)
class DeleteResult:
    """What an executed plan removed."""

    backups: int
    wal_files: int
    objects: int
    bytes: int
    seconds: float


def inventory(archive: Archive) -> Inventory:
    """List backups (manifests read) and WAL. A damaged manifest aborts: nothing is judged
    on a backup that cannot be identified."""
    summaries = []
    for name, objects in catalog.backup_objects(archive).items():
        manifest = None
        if catalog.has_manifest(objects):
            try:
                manifest = catalog.load_manifest(archive, name)
            except NotFound:  # deleted since the listing (another delete): incomplete now
                objects = [o for o in objects if not o.key.endswith("/" + backup_layout.MANIFEST)]
        if manifest is None:
            summaries.append(summary_of_incomplete(name, objects))
            continue
        summaries.append(BackupSummary(name, True, manifest.start_time, tuple(objects),
                                       manifest.stop_time, manifest.start_wal,
                                       manifest.timeline, manifest.backup_type,
                                       manifest.parent, manifest.referenced_backups))
    wal = tuple(archive.storage.list(wal_layout.WAL_PREFIX))
    return Inventory(tuple(summaries), wal)


def make_plan(archive: Archive, policy: Policy, now: datetime | None = None) -> Plan:
    """List the repository and decide what goes (nothing is deleted)."""
    policy.check()  # a usage error before any request
    found = inventory(archive)
    return plan(found.backups, found.wal, now or datetime.now(timezone.utc), policy)


def execute(archive: Archive, doomed: Plan, log: Log | None = None) -> DeleteResult:
    """Delete what ``doomed`` lists, in the safe order (see the module docstring)."""
    started = time.monotonic()
    storage = archive.storage
    objects = 0
    removed = 0
    for backup in doomed.delete_backups:
        manifests = [o for o in backup.objects if o.key.endswith("/" + backup_layout.MANIFEST)]
        rest = sorted((o for o in backup.objects if o not in manifests), key=lambda o: o.key)
        for info in manifests + rest:  # the manifest first: the backup turns incomplete
            storage.delete(info.key)
            objects += 1
            removed += info.size
        if log is not None:
            log(f"delete backup {backup.name} "
                f"({'complete' if backup.complete else 'incomplete'}) deleted "
                f"objects={len(backup.objects)} bytes={backup.stored_bytes}")
    for info in doomed.delete_wal:
        storage.delete(info.key)
        objects += 1
        removed += info.size
    if log is not None and doomed.delete_wal:
        first = wal_layout.wal_name(doomed.delete_wal[0].key)
        last = wal_layout.wal_name(doomed.delete_wal[-1].key)
        log(f"delete WAL {first} .. {last} deleted files={len(doomed.delete_wal)} "
            f"bytes={doomed.wal_bytes}")
    return DeleteResult(len(doomed.delete_backups), len(doomed.delete_wal), objects, removed,
                        time.monotonic() - started)


def describe(doomed: Plan) -> dict[str, object]:
    """The plan as plain values (``delete --json``)."""
    return {
        "now": doomed.now.astimezone(timezone.utc).isoformat(),
        "kept": [{"name": k.name, "complete": k.complete, "reasons": list(k.reasons)}
                 for k in doomed.kept],
        "delete_backups": [{"name": b.name, "complete": b.complete,
                            "objects": len(b.objects), "bytes": b.stored_bytes}
                           for b in doomed.delete_backups],
        "delete_wal": {"files": len(doomed.delete_wal), "bytes": doomed.wal_bytes,
                       "first": wal_layout.wal_name(doomed.delete_wal[0].key)
                       if doomed.delete_wal else None,
                       "last": wal_layout.wal_name(doomed.delete_wal[-1].key)
                       if doomed.delete_wal else None},
        "wal_cutoff": doomed.wal_cutoff,
        "wal_kept": doomed.kept_wal,
        "in_progress": list(doomed.in_progress),
        "protect_wal_since": datetime.fromtimestamp(doomed.protect_wal_since, timezone.utc
                                                    ).isoformat()
        if doomed.protect_wal_since is not None else None,
        "bytes": doomed.total_bytes,
        "notes": list(doomed.notes),
    }
