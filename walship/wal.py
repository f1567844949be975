"""The WAL model: LSNs, timelines, segment names for any segment size, and history files.

Pure functions and frozen values, no I/O. PostgreSQL names a WAL segment ``TTTTTTTTXXXXXXXXYYYYYYYY``:
timeline ``T``, then the segment number split into a "log" part ``X`` and a "seg" part ``Y``, where
``Y`` counts segments within each 4 GiB of WAL (so its range depends on ``wal_segment_size``).
Besides segments, the archive holds timeline history files (``TTTTTTTT.history``), partial
segments left by a promotion (``<segment>.partial``) and backup history files
(``<segment>.XXXXXXXX.backup``).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

MIN_SEGMENT_SIZE = 1 << 20
MAX_SEGMENT_SIZE = 1 << 30
DEFAULT_SEGMENT_SIZE = 16 << 20
_XLOG_SPAN = 1 << 32  # bytes of WAL per "log" id

_NAME = re.compile(
    r"(?P<tli>[0-9A-F]{8})(?:"
    r"(?P<log>[0-9A-F]{8})(?P<seg>[0-9A-F]{8})"
    r"(?:(?P<partial>\.partial)|\.(?P<offset>[0-9A-F]{8})\.backup)?"
    r"|(?P<history>\.history))"
)  # matched in full (fullmatch): with "$", a name ending in a newline would pass


class FileKind(enum.Enum):
    """What kind of file PostgreSQL hands to archive_command / asks of restore_command."""

    SEGMENT = "segment"
    PARTIAL = "partial"
    HISTORY = "history"
    BACKUP = "backup"


@dataclass(frozen=True, order=True)
class Lsn:
    """A WAL position (log sequence number), printed like PostgreSQL: ``16/B374D848``."""

    value: int

    @classmethod
    def parse(cls, text: str) -> Lsn:
        match = re.fullmatch(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})", text.strip())
        if not match:
            raise ValueError(f"not an LSN: {text!r}")
        return cls((int(match[1], 16) << 32) | int(match[2], 16))

    def __str__(self) -> str:
        return f"{self.value >> 32:X}/{self.value & 0xFFFFFFFF:X}"

    def segment_number(self, segment_size: int) -> int:
        """The number of the segment holding this position."""
        return self.value // segment_size


@dataclass(frozen=True)
class ArchiveFile:
    """A parsed archive file name. ``segment_number`` is None for history files and is
    meaningful only with the cluster's segment size (see :func:`segment_number`)."""

    name: str
    kind: FileKind
    timeline: int
    log: int | None = None
    seg: int | None = None

    def segment_number(self, segment_size: int) -> int:
        """The absolute segment number (position in WAL / segment size) for this segment size."""
        if self.log is None or self.seg is None:
            raise ValueError(f"{self.name} is not a segment")
        return self.log * segments_per_log(segment_size) + self.seg


def check_segment_size(size: int) -> int:
    """Return ``size`` if PostgreSQL allows it as wal_segment_size (a power of two, 1 MiB-1 GiB)."""
    if size < MIN_SEGMENT_SIZE or size > MAX_SEGMENT_SIZE or size & (size - 1):
        raise ValueError(f"invalid WAL segment size {size}: a power of two from 1 MiB to 1 GiB")
    return size


def segments_per_log(segment_size: int) -> int:
    """How many segments make up one 4 GiB "log" (the range of the last 8 hex digits)."""
    return _XLOG_SPAN // check_segment_size(segment_size)


def parse_name(name: str) -> ArchiveFile:
    """Parse a file name PostgreSQL archives or restores; raise ValueError for anything else."""
    match = _NAME.fullmatch(name)
    if not match:
        raise ValueError(f"not a WAL, history, partial or backup file name: {name!r}")
    timeline = int(match["tli"], 16)
    if timeline == 0:
        raise ValueError(f"timeline 0 does not exist: {name!r}")
    if match["history"]:
        return ArchiveFile(name, FileKind.HISTORY, timeline)
    log, seg = int(match["log"], 16), int(match["seg"], 16)
    if seg >= segments_per_log(MIN_SEGMENT_SIZE):
        raise ValueError(f"segment part out of range in {name!r}")
    kind = (FileKind.PARTIAL if match["partial"] else
            FileKind.BACKUP if match["offset"] else FileKind.SEGMENT)
    return ArchiveFile(name, kind, timeline, log, seg)


def segment_name(timeline: int, segment_number: int, segment_size: int) -> str:
    """The file name of a segment, as PostgreSQL's XLogFileName builds it."""
    per_log = segments_per_log(segment_size)
    return f"{timeline:08X}{segment_number // per_log:08X}{segment_number % per_log:08X}"


def next_segments(name: str, count: int, segment_size: int) -> list[str]:
    """The names of the ``count`` segments that follow segment ``name`` on its timeline."""
    current = parse_name(name)
    if current.kind is not FileKind.SEGMENT:
        raise ValueError(f"{name} is not a segment")
    number = current.segment_number(segment_size)
    return [segment_name(current.timeline, number + i, segment_size) for i in range(1, count + 1)]


def history_name(timeline: int) -> str:
    """The history file name of a timeline: ``00000002.history``."""
    return f"{timeline:08X}.history"


@dataclass(frozen=True)
class HistoryEntry:
    """One line of a timeline history file: ``parent`` ended at ``switchpoint``."""

    parent: int
    switchpoint: Lsn
    reason: str


def parse_history(text: str) -> list[HistoryEntry]:
    """Parse a ``.history`` file: the ancestry of a timeline, oldest first."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        if len(fields) < 2:
            raise ValueError(f"history file line {number} is malformed: {line!r}")
        entry = HistoryEntry(int(fields[0]), Lsn.parse(fields[1]),
                             fields[2] if len(fields) > 2 else "")
        if entries and entry.parent <= entries[-1].parent:
            raise ValueError(f"history file line {number}: timelines must increase")
        entries.append(entry)
    return entries


def timeline_of(lsn: Lsn, timeline: int, history: list[HistoryEntry]) -> int:
    """The timeline that ``lsn`` belongs to, for a server on ``timeline`` with that history."""
    for entry in history:
        if lsn < entry.switchpoint:
            return entry.parent
    return timeline
