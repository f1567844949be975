"""The retention policy: which backups and WAL files ``walship delete`` may remove. Pure: no I/O.

Inputs are summaries of the backups found (:class:`BackupSummary`), the stored WAL objects
(:class:`~walship.storage.base.ObjectInfo`, with their ``modified`` time) and the current time;
the output is a frozen :class:`Plan`. Executing a plan is :mod:`walship.prune`'s business.

**Backups retained.** Only complete backups (a manifest) are ever retained for a rule; a backup
is kept if ANY rule keeps it:

* always: the newest complete backup;
* ``retain_full=N``: the newest N complete FULL backups, and every backup that depends on one
  of them (its chain of parents leads to it: their differential and incremental backups);
* ``retain_days=D``: every complete backup that stops within D days of now, PLUS the newest one
  that stops before that window starts, so that a point-in-time restore to ANY point of the
  window still finds a backup stopping before it (``restore`` picks the newest backup stopping
  before its target);
* ``before_time=T``: the same as a window starting at T (every point from T on stays
  restorable); ``before_name=NAME``: backup NAME (which must be complete) and every newer one.

Whatever rule keeps a backup, every backup it depends on (its parent, the parent's parent... and
every backup holding a part it references) is kept too: a differential or incremental backup
is restorable only with its whole chain, so ``delete`` never removes a backup a kept one needs.

No rule at all is a usage error: "delete" never means "delete everything". "Newest" orders by
start time, then name, as ``LATEST`` does; windows compare stop times.

**Backups in progress.** A backup without a manifest may be one being pushed. It is deleted only
if it started before the oldest retained backup AND its newest object is older than
``incomplete_grace`` (an object of unknown age never is). While one is within the grace period,
WAL stored at or after its start time minus :data:`CLOCK_SKEW` is kept whatever its position:
the segments that backup will need were archived after it started. (A push whose first part is
not stored yet is invisible; it started after every complete backup unless two pushes overlap,
and the rule below never removes WAL at or after the newest complete backup's start.)

**WAL.** Let C be the smallest start segment among retained backups, compared as the 16 hex
digits ``log+seg`` of segment names (``name[8:24]``), which grow with the segment number for a
fixed segment size whatever the timeline. WAL segments, ``.partial`` and ``.backup`` files of
ANY timeline whose ``log+seg`` is below C are deleted; ``.history`` files never are; with no
complete backup, no WAL is.

Why this is safe: recovery from a backup that starts in segment s replays WAL forward from s.
Segment numbers never decrease along WAL: a timeline switch at LSN X starts the new timeline in
the segment holding X, and recovery (``recovery_target_timeline``, via the ``.history`` files,
which are all kept) reads every later segment from the newest timeline of its path that began
at or before it. So recovery from that backup, to any target on any timeline descending from
it, never asks for a segment below s on any timeline; every retained backup starts at or above
C, so nothing below C is needed by any retained backup. The rule uses only names and times: a
segment pushed concurrently by ``wal-push`` is at the end of WAL (>= the newest backup's start,
hence >= C) or, if archived late, still above C for the same reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from walship import layout as wal_layout
from walship import wal
from walship.backup import layout
from walship.errors import UsageError
from walship.storage.base import ObjectInfo

CLOCK_SKEW = timedelta(hours=1)
DEFAULT_INCOMPLETE_GRACE = timedelta(hours=24)


def position(name: str) -> str:
    """The ``log+seg`` part of a segment, partial or backup-label file name (``name[8:24]``)."""
    return name[8:24]


@dataclass(frozen=True)
class BackupSummary:
    """One backup as the policy sees it: its objects and, when complete, its manifest's times
    and start segment. An incomplete backup's ``start_time`` comes from its name."""

    name: str
    complete: bool
    start_time: datetime
    objects: tuple[ObjectInfo, ...] = ()
    stop_time: datetime | None = None
    start_wal: str | None = None
    timeline: int | None = None
    backup_type: str = "full"
    parent: str | None = None
    references: tuple[str, ...] = ()  # backups holding parts this one reads

    @property
    def depends_on(self) -> tuple[str, ...]:
        """The backups this one needs directly (its parent and the holders of its parts)."""
        return ((self.parent,) if self.parent else ()) + self.references

    @property
    def stored_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def newest_modified(self) -> float | None:
        """When its newest object was stored; None if any object's time is unknown."""
        times = [o.modified for o in self.objects]
        if not times or any(t is None for t in times):
            return None
        return max(t for t in times if t is not None)

    @property
    def order(self) -> tuple[datetime, tuple[str, int]]:
        return (self.start_time, layout.sort_key(self.name))


@dataclass(frozen=True)
class Policy:
    """What to keep. At least one of the four rules must be given."""

    retain_full: int | None = None
    retain_days: float | None = None
    before_name: str | None = None
    before_time: datetime | None = None
    incomplete_grace: timedelta = DEFAULT_INCOMPLETE_GRACE

    @property
    def empty(self) -> bool:
        return (self.retain_full is None and self.retain_days is None
                and self.before_name is None and self.before_time is None)

    def check(self) -> None:
        if self.empty:
            raise UsageError("no retention rule given", "delete never means delete "
                             "everything", "give --retain-full N, --retain-days D or "
                             "--before NAME|TIME")
        if self.retain_full is not None and self.retain_full < 1:
            raise UsageError("--retain-full must be at least 1")
        if self.retain_days is not None and self.retain_days < 0:
            raise UsageError("--retain-days cannot be negative")
        if self.incomplete_grace < timedelta(0):
            raise UsageError("--incomplete-grace cannot be negative")
        if self.before_time is not None and self.before_time.tzinfo is None:
            raise UsageError("--before needs a time with a time zone")


@dataclass(frozen=True)
class Kept:
    """A backup the plan keeps, and why (one reason per rule that keeps it)."""

    name: str
    complete: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """What ``delete`` removes, in the order it must: backups (manifest first), then WAL."""

    now: datetime
    policy: Policy
    kept: tuple[Kept, ...]
    delete_backups: tuple[BackupSummary, ...]  # oldest first
    delete_wal: tuple[ObjectInfo, ...]  # lowest position first
    wal_cutoff: str | None  # C: WAL below this log+seg position goes; None: no WAL goes
    protect_wal_since: float | None  # WAL stored at/after this POSIX time is kept
    in_progress: tuple[str, ...]  # incomplete backups within the grace period
    kept_wal: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def backup_bytes(self) -> int:
        return sum(b.stored_bytes for b in self.delete_backups)

    @property
    def wal_bytes(self) -> int:
        return sum(o.size for o in self.delete_wal)

    @property
    def total_bytes(self) -> int:
        return self.backup_bytes + self.wal_bytes

    @property
    def retained(self) -> tuple[str, ...]:
        """The complete backups kept."""
        return tuple(k.name for k in self.kept if k.complete)


def _retained(complete: Sequence[BackupSummary], policy: Policy, now: datetime
              ) -> dict[str, list[str]]:
    """Name -> reasons, for the complete backups (``complete`` sorted oldest first)."""
    reasons: dict[str, list[str]] = {}

    def keep(backup: BackupSummary, why: str) -> None:
        reasons.setdefault(backup.name, []).append(why)

    if not complete:
        return reasons
    keep(complete[-1], "newest complete backup")
    by_name = {b.name: b for b in complete}
    if policy.retain_full is not None:
        fulls = [b for b in complete if b.backup_type == "full"]
        kept_fulls = {b.name for b in fulls[-policy.retain_full:]}
        for backup in complete:
            root = _root(backup, by_name)
            if root in kept_fulls:
                keep(backup, f"one of the newest {policy.retain_full} full backups"
                     if root == backup.name else
                     f"depends on {root}, one of the newest {policy.retain_full} full backups")
    windows = []
    if policy.retain_days is not None:
        windows.append((now - timedelta(days=policy.retain_days),
                        f"within {policy.retain_days:g} days"))
    if policy.before_time is not None:
        windows.append((policy.before_time, "at or after --before"))
    for start, label in windows:
        before = None
        for backup in complete:
            assert backup.stop_time is not None
            if backup.stop_time >= start:
                keep(backup, f"stops {label}")
            elif before is None or (backup.stop_time, backup.order) > (
                    before.stop_time, before.order):  # type: ignore[operator]
                before = backup
        if before is not None:
            keep(before, f"newest stopping before the window ({label}) starts")
    if policy.before_name is not None:
        target = next((b for b in complete if b.name == policy.before_name), None)
        if target is None:
            raise UsageError(f"--before {policy.before_name}: no complete backup has that "
                             "name", hint="see walship backup-list")
        for backup in complete:
            if backup.order >= target.order:
                keep(backup, f"not older than {target.name}")
    # A kept backup keeps its whole chain (see the module docstring).
    pending = list(reasons)
    while pending:
        dependant = pending.pop()
        for name in dict.fromkeys(by_name[dependant].depends_on):
            if name in by_name:
                if name not in reasons:
                    pending.append(name)
                keep(by_name[name], f"{dependant} depends on it")
    return reasons


def _root(backup: BackupSummary, by_name: dict[str, BackupSummary]) -> str | None:
    """The full backup at the start of ``backup``'s chain of parents; None if the chain is
    broken (a parent missing) or loops."""
    seen: set[str] = set()
    current = backup
    while current.parent is not None:
        if current.name in seen or current.parent not in by_name:
            return None
        seen.add(current.name)
        current = by_name[current.parent]
    return current.name if current.backup_type == "full" else None


def plan(backups: Iterable[BackupSummary], wal_objects: Iterable[ObjectInfo], now: datetime,
         policy: Policy) -> Plan:
    """Decide what goes (see the module docstring for the rules and why they are safe)."""
    policy.check()
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    every = sorted(backups, key=lambda b: b.order)
    complete = [b for b in every if b.complete]
    for backup in complete:
        if backup.stop_time is None or backup.start_wal is None:
            raise ValueError(f"complete backup {backup.name} lacks its stop time or start WAL")
    reasons = _retained(complete, policy, now)
    retained = [b for b in complete if b.name in reasons]
    kept: list[Kept] = []
    doomed: list[BackupSummary] = []
    in_progress: list[BackupSummary] = []
    grace_start = (now - policy.incomplete_grace).timestamp()
    oldest_retained = retained[0].order if retained else None
    for backup in every:
        if backup.complete:
            if backup.name in reasons:
                kept.append(Kept(backup.name, True, tuple(reasons[backup.name])))
            else:
                doomed.append(backup)
            continue
        newest = backup.newest_modified
        if newest is None or newest >= grace_start:
            in_progress.append(backup)
            kept.append(Kept(backup.name, False,
                             ("incomplete, possibly in progress (within the grace period)",)))
        elif oldest_retained is not None and backup.order < oldest_retained:
            doomed.append(backup)
        else:
            kept.append(Kept(backup.name, False,
                             ("incomplete, not older than the oldest retained backup",)))

    cutoff = min((position(b.start_wal) for b in retained if b.start_wal), default=None)
    protect_since = None
    if in_progress:
        protect_since = (min(b.start_time for b in in_progress) - CLOCK_SKEW).timestamp()
    delete_wal: list[ObjectInfo] = []
    kept_wal = 0
    for info in wal_objects:
        if _wal_goes(info, cutoff, protect_since):
            delete_wal.append(info)
        else:
            kept_wal += 1
    delete_wal.sort(key=lambda o: (position(wal_layout.wal_name(o.key)), o.key))
    notes = []
    if not complete:
        notes.append("the repository holds no complete backup: nothing is deleted")
    return Plan(now, policy, tuple(kept), tuple(doomed), tuple(delete_wal), cutoff,
                protect_since, tuple(b.name for b in in_progress), kept_wal, tuple(notes))


def _wal_goes(info: ObjectInfo, cutoff: str | None, protect_since: float | None) -> bool:
    if cutoff is None or not info.key.startswith(wal_layout.WAL_PREFIX):
        return False
    try:
        parsed = wal.parse_name(wal_layout.wal_name(info.key))
    except ValueError:
        return False  # not a file walship archived: not ours to judge
    if parsed.kind is wal.FileKind.HISTORY:
        return False
    if position(parsed.name) >= cutoff:
        return False
    # A backup in progress needs what was stored since it started (unknown age: kept too).
    return protect_since is None or (info.modified is not None
                                     and info.modified < protect_since)


def summary_of_incomplete(name: str, objects: Sequence[ObjectInfo]) -> BackupSummary:
    """An incomplete backup: its start time read from its name (``YYYYMMDDTHHMMSSZ``)."""
    return BackupSummary(name, False, start_time_of(name), tuple(objects))


def start_time_of(name: str) -> datetime:
    """The start time a backup name records (UTC, whole seconds)."""
    from datetime import timezone

    match = layout.NAME_PATTERN.match(name)
    if not match:
        raise ValueError(f"not a backup name: {name!r}")
    return datetime.strptime(match["stamp"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
