"""What a base backup copies from the data directory, and what it leaves out.

:func:`scan` walks PGDATA and the tablespaces it links to and returns the directories,
symbolic links and files to store. It leaves out what PostgreSQL's documentation (continuous
archiving, "Making a Base Backup Using the Low Level API") and its own ``BASE_BACKUP`` leave out:

* the contents of ``pg_wal`` (the empty directory and ``pg_wal/archive_status`` are kept, and
  from PostgreSQL 17 on ``pg_wal/summaries``, empty: WAL summaries describe the server's own
  WAL, not the backup's, as in ``pg_basebackup``; walship's spool ``pg_wal/walship`` goes too), of
  ``pg_dynshmem``, ``pg_notify``, ``pg_replslot``, ``pg_serial``, ``pg_snapshots``,
  ``pg_stat_tmp`` and ``pg_subtrans`` (the directories themselves are kept);
* ``postmaster.pid``, ``postmaster.opts``, ``backup_label``, ``tablespace_map`` (the backup
  stores the ones ``pg_backup_stop`` returns), ``backup_label.old``, ``backup_manifest``,
  ``current_logfiles``, ``postgresql.auto.conf.tmp``;
* anywhere: ``pgsql_tmp*`` files and directories, ``pg_internal.init*`` files;
* in database directories: temporary relations (``t<digits>_<digits>...``) and every fork of an
  unlogged relation but its init fork (recovery rebuilds them from it);
* in a tablespace, the directories of other PostgreSQL major versions.

``global/pg_control`` is returned apart: it must be read after every other file (for a backup
taken on a standby, its minimum recovery point marks the end of the backup).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from walship.backup.manifest import PG_CONTROL, DirectoryEntry, LinkEntry, Tablespace
from walship.backup.parts import SourceFile
from walship.errors import UsageError

EXCLUDED_TOP_FILES = frozenset({
    "postmaster.pid", "postmaster.opts", "backup_label", "tablespace_map", "backup_label.old",
    "tablespace_map.old", "backup_manifest", "current_logfiles", "current_logfiles.tmp",
    "postgresql.auto.conf.tmp",
})
CONTENTS_EXCLUDED = frozenset({
    "pg_dynshmem", "pg_notify", "pg_replslot", "pg_serial", "pg_snapshots", "pg_stat_tmp",
    "pg_subtrans",
})
_TEMP_RELATION = re.compile(r"^t\d+_\d+(?:_(?:fsm|vm|init))?(?:\.\d+)?$")
_INIT_FORK = re.compile(r"^(\d+)_init(?:\.\d+)?$")
_RELATION_FORK = re.compile(r"^(\d+)(?:_(?:fsm|vm))?(?:\.\d+)?$")
_DATABASE_DIR = re.compile(r"^(?:base/\d+|pg_tblspc/\d+/PG_[^/]+/\d+)$")


@dataclass(frozen=True)
class Scan:
    """The content of a data directory to back up."""

    directories: tuple[DirectoryEntry, ...]
    links: tuple[LinkEntry, ...]
    files: tuple[SourceFile, ...]
    tablespaces: tuple[Tablespace, ...]
    pg_control: str  # where global/pg_control is read from, last

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def excluded(parent: str, name: str, is_dir: bool) -> bool:
    """Whether the entry ``name`` of the directory ``parent`` (relative, "" = top) is left out.

    Unlogged relations need the directory's listing and are handled by :func:`unlogged`.
    """
    if name.startswith("pgsql_tmp"):
        return True
    if not is_dir and name.startswith("pg_internal.init"):
        return True
    if parent == "" and not is_dir and name in EXCLUDED_TOP_FILES:
        return True
    if parent == "global" and name == "pg_control":
        return True  # read last, apart
    if not is_dir and _DATABASE_DIR.match(parent) and _TEMP_RELATION.match(name):
        return True
    return False


def unlogged(names: list[str]) -> set[str]:
    """The files of a database directory that belong to unlogged relations (init forks kept)."""
    init = {m[1] for m in map(_INIT_FORK.match, names) if m}
    if not init:
        return set()
    return {name for name in names
            if (m := _RELATION_FORK.match(name)) and m[1] in init}


def scan(pgdata: str | os.PathLike[str], pg_major: int,
         tablespace_names: dict[int, str] | None = None) -> Scan:
    """Walk ``pgdata`` (and its tablespaces) and list what a backup of it stores."""
    root = Path(pgdata)
    walker = _Walker(pg_major, tablespace_names or {})
    walker.walk(root, "")
    return Scan(tuple(walker.directories), tuple(walker.links), tuple(walker.files),
                tuple(walker.tablespaces), str(root / PG_CONTROL))


class _Walker:
    def __init__(self, pg_major: int, names: dict[int, str]) -> None:
        self.pg_major = pg_major
        self.names = names
        self.directories: list[DirectoryEntry] = []
        self.links: list[LinkEntry] = []
        self.files: list[SourceFile] = []
        self.tablespaces: list[Tablespace] = []

    def walk(self, disk: Path, rel: str) -> None:
        try:
            entries = sorted(os.scandir(disk), key=lambda e: e.name)
        except FileNotFoundError:
            return  # a database dropped while we walk
        except OSError as error:
            raise UsageError(f"cannot list {disk}", os.strerror(error.errno or 0),
                             "run backup-push as the cluster's OS user (postgres)") from None
        names = [e.name for e in entries]
        skip = unlogged(names) if _DATABASE_DIR.match(rel) else set()
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            is_link = stat.S_ISLNK(st.st_mode)
            is_dir = stat.S_ISDIR(st.st_mode)
            if excluded(rel, entry.name, is_dir) or entry.name in skip:
                continue
            if rel == "" and entry.name == "pg_wal":  # a directory or a link to one
                mode = st.st_mode & 0o7777 if is_dir else 0o700
                self.directories.append(DirectoryEntry("pg_wal", mode))
                self.directories.append(DirectoryEntry("pg_wal/archive_status", mode))
                if self.pg_major >= 17:  # summarize_wal's directory
                    self.directories.append(DirectoryEntry("pg_wal/summaries", mode))
                continue
            if rel == "pg_tblspc" and is_link:
                self._tablespace(entry, path)
                continue
            if is_link:
                self.links.append(LinkEntry(path, os.readlink(entry.path)))
            elif is_dir:
                self.directories.append(DirectoryEntry(path, st.st_mode & 0o7777))
                if not (rel == "" and entry.name in CONTENTS_EXCLUDED):
                    self.walk(Path(entry.path), path)
            elif stat.S_ISREG(st.st_mode):
                self.files.append(SourceFile(path, entry.path, st.st_size))
            # sockets, fifos and devices are never part of a cluster: left out

    def _tablespace(self, entry: os.DirEntry[str], path: str) -> None:
        if not entry.name.isdigit():
            return
        oid = int(entry.name)
        location = os.readlink(entry.path)
        self.tablespaces.append(Tablespace(oid, location, self.names.get(oid, "")))
        try:
            subdirs = sorted(os.scandir(entry.path), key=lambda e: e.name)
        except FileNotFoundError:
            return
        prefix = f"PG_{self.pg_major}_"
        for sub in subdirs:
            if sub.name.startswith(prefix) and sub.is_dir(follow_symlinks=False):
                sub_path = f"{path}/{sub.name}"
                mode = sub.stat(follow_symlinks=False).st_mode & 0o7777
                self.directories.append(DirectoryEntry(sub_path, mode))
                self.walk(Path(sub.path), sub_path)
