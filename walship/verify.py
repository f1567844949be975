"""``wal-verify``: is the WAL archive continuous and intact, as far back as the backups need?

For every timeline that holds segments, it follows the timeline's ancestry (its ``.history``
file) the way recovery does: segment n is read from the newest timeline of the path that began
at or before it. From the start segment of the oldest complete backup on that path (or, with
none, the oldest segment of the path present) to the timeline's newest segment, every expected
segment must be stored; a missing one is a *gap*, reported against the timeline it belongs to.

History consistency: a timeline above 1 that holds segments needs its history file; every
parent a history file names (above 1) needs its own; a parent's history must be the beginning
of its child's; a history file must be readable.

``deep`` also decodes every WAL object through the codec (its name-bound object digest and,
when encrypted, its authentication checked), writing nothing, and checks that segments have the
segment size. The segment size comes from the newest backup manifest, else the caller's.

Nothing here writes to the repository.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from walship import layout, wal
from walship.archive import Archive
from walship.backup import catalog
from walship.backup.manifest import Manifest
from walship.errors import WalshipError
from walship.storage.base import ObjectInfo


@dataclass(frozen=True)
class Gap:
    """Consecutive missing segments ``first``..``last`` of one timeline."""

    timeline: int
    first: str
    last: str
    count: int


@dataclass(frozen=True)
class TimelineReport:
    timeline: int
    segments: int
    bytes: int
    first: str | None
    last: str | None
    checked_from: str | None  # where continuity is checked from (see the module docstring)
    parents: tuple[int, ...]
    gaps: tuple[Gap, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def missing(self) -> int:
        return sum(g.count for g in self.gaps)


@dataclass(frozen=True)
class Damage:
    name: str
    why: str


@dataclass(frozen=True)
class WalReport:
    segment_size: int
    segment_size_from: str
    oldest_backup: str | None
    timelines: tuple[TimelineReport, ...]
    damaged: tuple[Damage, ...] = ()
    deep: bool = False
    objects: int = 0
    decoded_bytes: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def gaps(self) -> int:
        return sum(t.missing for t in self.timelines)

    @property
    def problems(self) -> int:
        return sum(len(t.problems) for t in self.timelines)

    @property
    def ok(self) -> bool:
        return not self.gaps and not self.problems and not self.damaged


def _decode(archive: Archive, info: ObjectInfo) -> bytes:
    with archive.storage.get(info.key) as download:
        return b"".join(archive.codec.decode(info.key, download, download.info.metadata))


def _decoded_size(archive: Archive, info: ObjectInfo) -> int:
    size = 0
    with archive.storage.get(info.key) as download:
        for chunk in archive.codec.decode(info.key, download, download.info.metadata):
            size += len(chunk)
    return size


def _ranges(timeline: int, numbers: list[int], segment_size: int) -> list[Gap]:
    """Sorted segment numbers as ranges of consecutive ones."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return [Gap(timeline, wal.segment_name(timeline, a, segment_size),
                wal.segment_name(timeline, b, segment_size), b - a + 1) for a, b in runs]


def verify_wal(archive: Archive, *, segment_size: int = wal.DEFAULT_SEGMENT_SIZE,
               deep: bool = False, parallel: int = 3,
               progress: Callable[[int], None] | None = None) -> WalReport:
    """Check the archive (see the module docstring); report, never raise for what it finds."""
    manifests: list[Manifest] = [e.manifest for e in catalog.list_backups(archive)
                                 if e.manifest is not None]
    size_from = "--wal-segment-size"
    if manifests:
        newest = max(manifests, key=lambda m: m.start_time)
        segment_size, size_from = newest.wal_segment_size, f"backup {newest.name}"
    wal.check_segment_size(segment_size)
    objects = list(archive.storage.list(layout.WAL_PREFIX))
    notes: list[str] = []
    segments: dict[int, dict[int, ObjectInfo]] = {}
    histories_stored: dict[int, ObjectInfo] = {}
    parsed: dict[str, wal.ArchiveFile] = {}
    for info in objects:
        name = layout.wal_name(info.key)
        try:
            item = wal.parse_name(name)
        except ValueError:
            notes.append(f"ignored {info.key}: not a WAL file name")
            continue
        parsed[info.key] = item
        if item.kind is wal.FileKind.SEGMENT:
            segments.setdefault(item.timeline, {})[item.segment_number(segment_size)] = info
        elif item.kind is wal.FileKind.HISTORY:
            histories_stored[item.timeline] = info

    damaged: list[Damage] = []
    histories: dict[int, list[wal.HistoryEntry]] = {1: []}
    for tli, info in sorted(histories_stored.items()):
        try:
            histories[tli] = wal.parse_history(_decode(archive, info).decode("utf-8"))
        except (WalshipError, ValueError) as error:
            text = error.one_line() if isinstance(error, WalshipError) else str(error)
            damaged.append(Damage(layout.wal_name(info.key), f"unreadable history: {text}"))

    reports = []
    missing_all: dict[int, set[int]] = {}  # a gap belongs to the timeline of its segment
    present = {(t, n) for t, numbers in segments.items() for n in numbers}
    oldest_backup = min(manifests, key=lambda m: m.start_time).name if manifests else None
    for tli in sorted(set(segments) | set(histories_stored)):
        problems: list[str] = []
        history = histories.get(tli)
        if history is None:
            if tli in histories_stored:
                history = []  # unreadable: reported as damage
            elif tli > 1 and tli in segments:
                problems.append(f"timeline {tli} has segments but no {wal.history_name(tli)}")
                history = []
            else:
                history = []
        parents = tuple(e.parent for e in history)
        for i, entry in enumerate(history):
            if entry.parent >= tli:
                problems.append(f"{wal.history_name(tli)} names parent {entry.parent}, not "
                                "an older timeline")
            elif entry.parent > 1 and entry.parent not in histories_stored:
                problems.append(f"{wal.history_name(tli)} names parent {entry.parent}, whose "
                                f"{wal.history_name(entry.parent)} is missing")
            elif entry.parent in histories:
                mine = [(e.parent, e.switchpoint) for e in history[:i]]
                theirs = [(e.parent, e.switchpoint) for e in histories[entry.parent]]
                if mine != theirs:
                    problems.append(f"{wal.history_name(tli)} disagrees with "
                                    f"{wal.history_name(entry.parent)} about the ancestry")
        numbers = sorted(segments.get(tli, {}))

        def source(n: int, tli: int = tli, history: list[wal.HistoryEntry] = history) -> int:
            return wal.timeline_of(wal.Lsn((n + 1) * segment_size - 1), tli, history)

        checked_from = None
        if numbers:
            newest_n = numbers[-1]
            starts = [m.start_lsn.segment_number(segment_size) for m in manifests
                      if wal.timeline_of(m.start_lsn, tli, history) == m.timeline]
            if starts:
                start = min(starts)
            else:
                on_path = [n for (t, n) in present if source(n) == t and (t == tli or t in
                                                                          parents)]
                start = min(on_path) if on_path else numbers[0]
            checked_from = wal.segment_name(source(start), start, segment_size)
            for n in range(start, newest_n + 1):
                owner = source(n)
                if (owner, n) not in present:
                    missing_all.setdefault(owner, set()).add(n)
        stored = list(segments.get(tli, {}).values())
        reports.append(TimelineReport(
            tli, len(numbers), sum(i.size for i in stored),
            wal.segment_name(tli, numbers[0], segment_size) if numbers else None,
            wal.segment_name(tli, numbers[-1], segment_size) if numbers else None,
            checked_from, parents, (), tuple(problems)))
    known = {r.timeline for r in reports}
    reports += [TimelineReport(t, 0, 0, None, None, None, ()) for t in missing_all
                if t not in known]  # an ancestor with no segment left at all
    reports = sorted((replace(r, gaps=tuple(_ranges(r.timeline, sorted(missing_all.get(
        r.timeline, ())), segment_size))) for r in reports), key=lambda r: r.timeline)

    decoded = 0
    if deep:
        def check(info: ObjectInfo) -> tuple[int, Damage | None]:
            item = parsed.get(info.key)
            name = layout.wal_name(info.key)
            try:
                size = _decoded_size(archive, info)
            except WalshipError as error:
                return 0, Damage(name, error.one_line())
            if item is not None and item.kind in (wal.FileKind.SEGMENT, wal.FileKind.PARTIAL) \
                    and size != segment_size:
                return size, Damage(name, f"decodes to {size} bytes, not the segment size "
                                          f"{segment_size}")
            return size, None

        with ThreadPoolExecutor(max_workers=max(1, parallel),
                                thread_name_prefix="walship-verify") as pool:
            for size, damage in pool.map(check, objects):
                decoded += size
                if damage is not None:
                    damaged.append(damage)
                if progress is not None:
                    progress(size)
    return WalReport(segment_size, size_from, oldest_backup, tuple(reports),
                     tuple(sorted(damaged, key=lambda d: d.name)), deep, len(objects), decoded,
                     tuple(notes))


def report_dict(report: WalReport) -> dict[str, object]:
    """The report as plain values (``--json``)."""
    return {
        "ok": report.ok, "segment_size": report.segment_size,
        "segment_size_from": report.segment_size_from, "oldest_backup": report.oldest_backup,
        "objects": report.objects, "deep": report.deep, "decoded_bytes": report.decoded_bytes,
        "missing_segments": report.gaps, "problems": report.problems,
        "timelines": [{"timeline": t.timeline, "segments": t.segments, "bytes": t.bytes,
                       "first": t.first, "last": t.last, "checked_from": t.checked_from,
                       "parents": list(t.parents),
                       "gaps": [{"first": g.first, "last": g.last, "count": g.count}
                                for g in t.gaps],
                       "problems": list(t.problems)} for t in report.timelines],
        "damaged": [{"name": d.name, "why": d.why} for d in report.damaged],
        "notes": list(report.notes),
    }
