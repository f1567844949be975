"""The backup manifest: what a base backup holds, as frozen values and their JSON form.

The manifest is the commit point of a backup (see :mod:`walship.backup.layout`): it is written
last, through the codec, and a backup is usable only once it exists. It records the server the
backup came from (version, system identifier, timeline), the WAL range needed to make it
consistent (start and stop LSN and segment names), every stored file with the SHA-256 and size
of the bytes actually stored, the directories, symbolic links and tablespaces to recreate, and
every part with its plaintext and stored sizes.

A differential or incremental backup (format version 2; a full backup is still written as
version 1, readable by older walship) names its ``type`` and ``parent``, and stores only the
files that changed: every other file's entry names the backup whose part holds its bytes
(``backup``, always the original holder, never a chain of references), and that part is listed
in ``referenced_parts`` with the object digest its own manifest records, so a restore reads each
file from exactly one object and checks every byte against this manifest.

Block-level deltas (format version 3, written only by a backup that has at least one): a large
relation file that changed in a few blocks is stored as its *pieces* (:class:`Piece`), applied
in order: a base (the whole file, or a set of blocks covering it) and the blocks that changed in
each later backup (see :mod:`walship.backup.blocks`). The entry's ``size`` and ``sha256`` are
those of the rebuilt file; ``backup``/``part`` name the base's holder; every piece's holder is
listed, like any other holder, in ``parts`` or ``referenced_parts``. Chains are resolved when
the backup is taken: restore never reads another manifest to rebuild a file. Every backup (full
too) lists its per-block digest maps in ``block_maps`` (objects apart from the parts, one per
part holding a large relation file), with the server's ``block_size``.

This module is pure: no I/O. :func:`Manifest.to_json` and :func:`Manifest.from_json` are exact
inverses; reading refuses a manifest of another format or of a newer format version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from walship import wal

FORMAT = "walship-backup"
FORMAT_VERSION = 3  # the newest this walship reads; full backups are still written as 1
FULL, DIFF, INCR = "full", "diff", "incr"
BACKUP_TYPES = (FULL, DIFF, INCR)

# Files restore writes only after every other file is verified (see walship.backup.fetch).
BACKUP_LABEL = "backup_label"
TABLESPACE_MAP = "tablespace_map"
PG_CONTROL = "global/pg_control"
PG_VERSION = "PG_VERSION"


class ManifestError(ValueError):
    """The manifest text is not a manifest this walship can read."""


PIECE_FILE, PIECE_BLOCKS = "file", "blocks"


@dataclass(frozen=True)
class Piece:
    """One stored piece of a block-delta file, in part ``part`` of ``backup`` ("" = this
    backup): ``file``, the whole file as a tar member (only as the first piece), or
    ``blocks``, block members (see :mod:`walship.backup.blocks`); ``size`` and ``sha256``
    are those of the piece's own bytes (the member, or the block members' contents in order)."""

    backup: str
    part: int
    kind: str
    size: int
    sha256: str

    @property
    def holder(self) -> tuple[str, int]:
        return (self.backup, self.part)


@dataclass(frozen=True)
class FileEntry:
    """A regular file stored in part ``part``: ``size`` bytes whose SHA-256 is ``sha256``.
    ``backup`` names the (older) backup whose part holds the bytes; empty: this backup.
    With ``pieces`` (block deltas), ``size`` is the rebuilt file's and ``backup``/``part``
    the holder of the first piece; its digest is ``blocks_sha256``, the SHA-256 of its block
    digests (its block map's, see :mod:`walship.backup.blocks`), with no ``sha256`` (""). (Older
    manifests give ``sha256`` instead when every block was read.)"""

    path: str
    size: int
    mode: int
    mtime: float
    sha256: str
    part: int
    backup: str = ""
    pieces: tuple[Piece, ...] = ()
    blocks_sha256: str = ""

    @property
    def holder(self) -> tuple[str, int]:
        """(backup name or "" for this one, part number): the part holding the bytes."""
        return (self.backup, self.part)


@dataclass(frozen=True)
class DirectoryEntry:
    path: str
    mode: int


@dataclass(frozen=True)
class LinkEntry:
    """A symbolic link inside the data directory other than a tablespace link."""

    path: str
    target: str


@dataclass(frozen=True)
class Tablespace:
    """A tablespace: ``pg_tblspc/<oid>`` pointed at ``location`` when the backup was taken."""

    oid: int
    location: str
    name: str = ""

    @property
    def link(self) -> str:
        return f"pg_tblspc/{self.oid}"


@dataclass(frozen=True)
class PartEntry:
    """One stored part: ``size`` plaintext (tar) bytes, ``stored_size`` bytes in the repository,
    and ``digest``, the object digest of those stored bytes (see :mod:`walship.codec`; absent
    in manifests written before walship recorded it)."""

    number: int
    key: str
    size: int
    stored_size: int
    files: int
    digest: str | None = None
    backup: str = ""  # in referenced_parts: the backup the part belongs to


def _time(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ManifestError(f"time without a time zone: {text!r}")
    return value


def format_time(value: datetime) -> str:
    """UTC, ISO 8601, microseconds, ``Z``: ``2026-11-25T02:00:00.123456Z``."""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Manifest:
    """Everything restore needs to know about one complete base backup."""

    name: str
    label: str
    pg_version: int  # server_version_num, e.g. 150004
    system_identifier: str
    timeline: int
    start_lsn: wal.Lsn
    stop_lsn: wal.Lsn
    start_wal: str
    stop_wal: str
    wal_segment_size: int
    start_time: datetime
    stop_time: datetime
    from_standby: bool
    data_directory: str
    data_mode: int = 0o700
    owner_user: str = ""
    owner_group: str = ""
    tablespaces: tuple[Tablespace, ...] = ()
    directories: tuple[DirectoryEntry, ...] = ()
    links: tuple[LinkEntry, ...] = ()
    files: tuple[FileEntry, ...] = ()
    parts: tuple[PartEntry, ...] = ()
    walship_version: str = ""
    backup_type: str = FULL
    parent: str | None = None
    referenced_parts: tuple[PartEntry, ...] = ()
    block_size: int = 0  # the server's block size, when block maps are recorded
    block_maps: tuple[PartEntry, ...] = ()  # per-block digest maps, by part number
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    # -- derived values ------------------------------------------------------------------------
    @property
    def duration(self) -> float:
        return (self.stop_time - self.start_time).total_seconds()

    @property
    def size(self) -> int:
        """Bytes of file data in the backup."""
        return sum(f.size for f in self.files)

    @property
    def stored_size(self) -> int:
        """Bytes this backup's own parts and block maps take in the repository (the manifest
        excluded)."""
        return sum(p.stored_size for p in self.parts + self.block_maps)

    @property
    def referenced_backups(self) -> tuple[str, ...]:
        """The older backups holding some of this backup's files, sorted."""
        return tuple(sorted({p.backup for p in self.referenced_parts}))

    @property
    def all_parts(self) -> tuple[PartEntry, ...]:
        """Every part a restore reads: this backup's own and those it references."""
        return self.parts + self.referenced_parts

    @property
    def version(self) -> int:
        """The format version written: 1 for a full backup (older walship reads it), 2 for a
        backup that depends on another, 3 for one with block deltas."""
        if any(f.pieces for f in self.files):
            return 3
        return 1 if (self.backup_type == FULL and self.parent is None
                     and not self.referenced_parts) else 2

    @property
    def pg_major(self) -> int:
        return self.pg_version // 10000

    def needed_wal(self) -> list[str]:
        """The segments, start to stop, that recovery must replay to make the backup consistent."""
        start = wal.parse_name(self.start_wal).segment_number(self.wal_segment_size)
        stop = wal.parse_name(self.stop_wal).segment_number(self.wal_segment_size)
        return [wal.segment_name(self.timeline, n, self.wal_segment_size)
                for n in range(start, stop + 1)]

    def tablespace(self, oid: int) -> Tablespace | None:
        return next((t for t in self.tablespaces if t.oid == oid), None)

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "name": self.name,
            "label": self.label,
            "walship_version": self.walship_version,
            "pg_version": self.pg_version,
            "system_identifier": self.system_identifier,
            "timeline": self.timeline,
            "start_lsn": str(self.start_lsn),
            "stop_lsn": str(self.stop_lsn),
            "start_wal": self.start_wal,
            "stop_wal": self.stop_wal,
            "wal_segment_size": self.wal_segment_size,
            "start_time": format_time(self.start_time),
            "stop_time": format_time(self.stop_time),
            "duration": round(self.duration, 3),
            "from_standby": self.from_standby,
            "data_directory": self.data_directory,
            "data_mode": self.data_mode,
            "owner": {"user": self.owner_user, "group": self.owner_group},
            "tablespaces": [{"oid": t.oid, "location": t.location, "name": t.name}
                            for t in self.tablespaces],
            "directories": [{"path": d.path, "mode": d.mode} for d in self.directories],
            "links": [{"path": link.path, "target": link.target} for link in self.links],
            "files": [{"path": f.path, "size": f.size, "mode": f.mode, "mtime": f.mtime,
                       "sha256": f.sha256, "part": f.part,
                       **({"backup": f.backup} if f.backup else {}),
                       **({"pieces": [_piece_dict(p) for p in f.pieces]} if f.pieces else {}),
                       **({"blocks_sha256": f.blocks_sha256} if f.blocks_sha256 else {})}
                      for f in self.files],
            "parts": [_part_dict(p) for p in self.parts],
            "totals": {"files": len(self.files), "size": self.size,
                       "stored_size": self.stored_size, "parts": len(self.parts)},
            **({"type": self.backup_type, "parent": self.parent,
                "referenced_parts": [_part_dict(p) for p in self.referenced_parts]}
               if self.version > 1 else {}),
            **({"block_size": self.block_size,
                "block_maps": [_part_dict(p) for p in self.block_maps]}
               if self.block_size else {}),
            **self.extra,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ManifestError(f"not JSON: {error}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ManifestError("not a walship backup manifest")
        version = doc.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ManifestError(f"manifest format version {version!r} is newer than this "
                                f"walship reads ({FORMAT_VERSION})")
        known = {"format", "version", "name", "label", "walship_version", "pg_version",
                 "system_identifier", "timeline", "start_lsn", "stop_lsn", "start_wal",
                 "stop_wal", "wal_segment_size", "start_time", "stop_time", "duration",
                 "from_standby", "data_directory", "data_mode", "owner", "tablespaces",
                 "directories", "links", "files", "parts", "totals", "type", "parent",
                 "referenced_parts", "block_size", "block_maps"}
        try:
            owner = doc.get("owner") or {}
            manifest = cls(
                name=str(doc["name"]),
                label=str(doc["label"]),
                walship_version=str(doc.get("walship_version", "")),
                pg_version=int(doc["pg_version"]),
                system_identifier=str(doc["system_identifier"]),
                timeline=int(doc["timeline"]),
                start_lsn=wal.Lsn.parse(doc["start_lsn"]),
                stop_lsn=wal.Lsn.parse(doc["stop_lsn"]),
                start_wal=str(doc["start_wal"]),
                stop_wal=str(doc["stop_wal"]),
                wal_segment_size=wal.check_segment_size(int(doc["wal_segment_size"])),
                start_time=_time(doc["start_time"]),
                stop_time=_time(doc["stop_time"]),
                from_standby=bool(doc["from_standby"]),
                data_directory=str(doc["data_directory"]),
                data_mode=int(doc.get("data_mode", 0o700)),
                owner_user=str(owner.get("user", "")),
                owner_group=str(owner.get("group", "")),
                tablespaces=tuple(Tablespace(int(t["oid"]), str(t["location"]),
                                             str(t.get("name", "")))
                                  for t in doc["tablespaces"]),
                directories=tuple(DirectoryEntry(str(d["path"]), int(d["mode"]))
                                  for d in doc["directories"]),
                links=tuple(LinkEntry(str(link["path"]), str(link["target"]))
                            for link in doc.get("links", [])),
                files=tuple(FileEntry(str(f["path"]), int(f["size"]), int(f["mode"]),
                                      float(f["mtime"]), str(f["sha256"]), int(f["part"]),
                                      str(f.get("backup", "")),
                                      tuple(_piece(p) for p in f.get("pieces", [])),
                                      str(f.get("blocks_sha256", "")))
                            for f in doc["files"]),
                parts=tuple(_part(p) for p in doc["parts"]),
                backup_type=str(doc.get("type", FULL)),
                parent=None if doc.get("parent") is None else str(doc["parent"]),
                referenced_parts=tuple(_part(p) for p in doc.get("referenced_parts", [])),
                block_size=int(doc.get("block_size", 0)),
                block_maps=tuple(_part(p) for p in doc.get("block_maps", [])),
                extra={k: v for k, v in doc.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ManifestError(f"malformed manifest: {type(error).__name__}: {error}") from None
        manifest.check()
        if manifest.version != version:
            raise ManifestError(f"a format version {version} manifest of a "
                                f"{manifest.backup_type} backup")
        return manifest

    def check(self) -> None:
        """Raise :class:`ManifestError` unless the manifest is internally consistent."""
        for name in (self.start_wal, self.stop_wal):
            try:
                parsed = wal.parse_name(name)
            except ValueError as error:
                raise ManifestError(str(error)) from None
            if parsed.kind is not wal.FileKind.SEGMENT or parsed.timeline != self.timeline:
                raise ManifestError(f"{name} is not a segment of timeline {self.timeline}")
        if self.stop_lsn < self.start_lsn:
            raise ManifestError("stop LSN precedes start LSN")
        if self.backup_type not in BACKUP_TYPES:
            raise ManifestError(f"unknown backup type {self.backup_type!r}")
        if (self.backup_type == FULL) != (self.parent is None):
            raise ManifestError("a full backup has no parent, any other has one")
        if self.backup_type == FULL and self.referenced_parts:
            raise ManifestError("a full backup references no other backup's part")
        if any(p.backup for p in self.parts):
            raise ManifestError("an own part names another backup")
        parts = {("", p.number) for p in self.parts}
        for part in self.referenced_parts:
            if not part.backup or part.backup == self.name:
                raise ManifestError("a referenced part does not name another backup")
            parts.add((part.backup, part.number))
        if len(parts) != len(self.parts) + len(self.referenced_parts):
            raise ManifestError("duplicate part numbers")
        seen: set[str] = set()
        for entry in self.files:
            _check_path(entry.path)
            if entry.path in seen:
                raise ManifestError(f"file {entry.path} is listed twice")
            seen.add(entry.path)
            if entry.holder not in parts or entry.backup == self.name:
                raise ManifestError(f"file {entry.path} is in part {entry.part}, not listed")
            digest = entry.sha256 or (entry.blocks_sha256 if entry.pieces else "")
            if len(digest) != 64 or entry.size < 0 or entry.blocks_sha256 and (
                    not entry.pieces or len(entry.blocks_sha256) != 64):
                raise ManifestError(f"file {entry.path} has a malformed size or digest")
            if entry.pieces:
                _check_pieces(entry, parts, self.block_size)
        if self.block_maps and self.block_size <= 0:
            raise ManifestError("block maps without a block size")
        for directory in self.directories:
            _check_path(directory.path)
        for link in self.links:
            _check_path(link.path)
        for space in self.tablespaces:
            if not space.location.startswith("/"):
                raise ManifestError(f"tablespace {space.oid} location is not absolute")
        for required in (BACKUP_LABEL, PG_CONTROL, PG_VERSION):
            if required not in seen:
                raise ManifestError(f"the backup has no {required}")


def _part_dict(p: PartEntry) -> dict[str, Any]:
    return {"number": p.number, "key": p.key, "size": p.size, "stored_size": p.stored_size,
            "files": p.files, **({"digest": p.digest} if p.digest else {}),
            **({"backup": p.backup} if p.backup else {})}


def _piece_dict(p: Piece) -> dict[str, Any]:
    return {"part": p.part, "kind": p.kind, "size": p.size, "sha256": p.sha256,
            **({"backup": p.backup} if p.backup else {})}


def _piece(p: dict[str, Any]) -> Piece:
    return Piece(str(p.get("backup", "")), int(p["part"]), str(p["kind"]), int(p["size"]),
                 str(p["sha256"]))


def _check_pieces(entry: FileEntry, parts: set[tuple[str, int]], block_size: int) -> None:
    """A block-delta entry: its base first, then deltas, each in a listed part of a backup of
    its own, the first piece's holder being the entry's."""
    what = f"file {entry.path}"
    if block_size <= 0:
        raise ManifestError(f"{what} has block pieces but the manifest no block size")
    if entry.pieces[0].holder != entry.holder:
        raise ManifestError(f"{what}: its first piece is not in part {entry.part}")
    if len({p.backup for p in entry.pieces}) != len(entry.pieces):
        raise ManifestError(f"{what}: two pieces in one backup")
    for number, piece in enumerate(entry.pieces):
        if piece.holder not in parts:
            raise ManifestError(f"{what}: a piece in part {piece.part}, not listed")
        if piece.kind not in (PIECE_FILE, PIECE_BLOCKS) or (
                piece.kind == PIECE_FILE and number > 0):
            raise ManifestError(f"{what}: a piece of kind {piece.kind!r} at {number}")
        if len(piece.sha256) != 64 or piece.size < 0:
            raise ManifestError(f"{what}: a piece with a malformed size or digest")


def _part(p: dict[str, Any]) -> PartEntry:
    return PartEntry(int(p["number"]), str(p["key"]), int(p["size"]), int(p["stored_size"]),
                     int(p["files"]), str(p["digest"]) if p.get("digest") else None,
                     str(p.get("backup", "")))


def _check_path(path: str) -> None:
    """A stored path is relative, normalised, and never climbs out of the data directory."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) \
            or "\x00" in path:
        raise ManifestError(f"unsafe path in manifest: {path!r}")


def parse_backup_label(text: str) -> dict[str, str]:
    """The ``KEY: value`` lines of a backup_label file."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def parse_tablespace_map(text: str) -> dict[int, str]:
    """``oid -> location`` from a tablespace_map, read as PostgreSQL reads it: ``<oid> <path>``
    lines ended by an unescaped newline or carriage return, ``\\`` escaping the next character."""
    spaces: dict[int, str] = {}
    line: list[str] = []
    escaped = False
    for char in text + "\n":
        if not escaped and char in "\r\n":
            if line:
                entry = "".join(line)
                oid, sep, location = entry.partition(" ")
                if not sep or not oid.isdigit():
                    raise ValueError(f"malformed tablespace_map line {entry!r}")
                spaces[int(oid)] = location
            line, escaped = [], False
            continue
        if not escaped and char == "\\":
            escaped = True
            continue
        line.append(char)
        escaped = False
    return spaces


def format_tablespace_map(spaces: dict[int, str]) -> str:
    """A tablespace_map in the format PostgreSQL writes and reads."""
    lines = []
    for oid, location in spaces.items():
        escaped = "".join("\\" + c if c in "\n\r\\" else c for c in location)
        lines.append(f"{oid} {escaped}\n")
    return "".join(lines)
