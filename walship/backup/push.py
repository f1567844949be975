"""``backup-push``: take an online base backup of a running server into the repository.

The sequence: start a non-exclusive backup in one session; read PGDATA and the tablespaces
directly from disk (:mod:`walship.backup.scan`), as tar parts streamed through the codec into
the storage, ``parallel`` parts at a time; read ``global/pg_control`` last; stop the backup
(without PostgreSQL's own wait for the archiver, which looks only once a second); store a final
part holding pg_control and the ``backup_label`` and ``tablespace_map`` that the stop returned;
on a primary, poll the repository until the WAL the backup needs is there (bounded); write the
manifest (the commit point); check again that the WAL is in the archive, and warn if not.

Differential and incremental backups (``backup_type`` ``diff`` / ``incr``): the parent is the
newest full backup (diff) or the newest backup of any type (incr) whose chain is complete, taken
from the same cluster (system identifier), the same major version and the timeline the server
is on now; without one, a full backup is taken and the log says why. Every file is still read
and hashed: a file is stored as a reference to the parent's bytes only when its size AND its
SHA-256 equal the parent's entry (see :func:`unchanged_files`; the README explains why size and
time are never enough). A reference names the backup and part that actually hold the bytes
(resolved through the parent's own references), so a restore reads each file from one object.

Large relation files (:mod:`walship.backup.blocks`) are compared block by block instead: every
backup records their block maps; a diff or incr reads its parent's maps alongside its own parts
(in the same file order) and stores only the blocks whose digest differs, the entry listing the
pieces (base and deltas, resolved through the parent's entry) that rebuild the file. A change
source (``changed_blocks``) may narrow which blocks are compared; without one, the WAL since
the parent says which blocks changed (:func:`wal_summary_source`: the server's WAL summaries on
PostgreSQL 17 and later, else the WAL records themselves), and when it cannot prove the range
every block is read and compared.

Promises: memory stays bounded whatever the cluster's size (one read buffer and one compressor
per part in flight); a backup is listed as usable only once everything it needs is stored; on
any failure the backup is aborted on the server, the parts already stored are deleted (as far
as possible: a killed process leaves parts without a manifest, which are never used).
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from walship import __version__, wal
from walship.archive import Archive
from walship.backup import blocks as block_delta
from walship.backup import catalog, layout
from walship.backup.manifest import (BACKUP_LABEL, DIFF, FULL, INCR, PG_CONTROL, PIECE_FILE,
                                     TABLESPACE_MAP, FileEntry, Manifest, PartEntry, Piece,
                                     parse_backup_label)
from walship.backup.parts import (DEFAULT_PART_SIZE, BlockContext, Cancelled, ParentFile,
                                  PartWriter, SourceFile, pipelined, plan_parts)
from walship.backup.progress import Progress
from walship.backup.scan import Scan, scan
from walship.backup.source import BackupSource, ServerInfo, StopResult
from walship.codec import OBJECT_DIGEST_METADATA
from walship.errors import IntegrityError, UsageError, WalshipError

Log = Callable[[str], None]


@dataclass(frozen=True)
class PushResult:
    """What a backup-push stored, for its log line."""

    manifest: Manifest
    bytes_in: int  # plaintext (tar) bytes of every part
    bytes_out: int  # bytes stored, manifest included
    seconds: float
    skipped: int  # files that vanished before they could be read
    wal_missing: tuple[str, ...]  # segments the backup needs that are not archived yet
    referenced: int = 0  # files unchanged since the parent, stored as references
    note: str = ""  # why a diff or incr backup became a full one
    deltas: int = 0  # large relation files stored as their changed blocks


@dataclass(frozen=True)
class _StoredPart:
    part: PartEntry
    files: tuple[FileEntry, ...]
    skipped: tuple[str, ...]
    block_map: PartEntry | None = None


def choose_name(archive: Archive, start: datetime) -> str:
    """The UTC start time as a name, with a suffix when it is already taken."""
    base = layout.base_name(start)
    for attempt in range(1, 1000):
        name = layout.with_suffix(base, attempt)
        if not catalog.name_taken(archive, name):
            return name
    raise UsageError(f"too many backups named {base}*")


def store_part(archive: Archive, name: str, number: int, files: Sequence[SourceFile], *,
               progress: Callable[[int], None] | None = None,
               cancel: threading.Event | None = None,
               blocks: BlockContext | None = None) -> _StoredPart:
    """Stream ``files`` as tar part ``number`` of backup ``name`` into the repository, and
    the block map of its large relation files (``blocks``) beside it: the map is stored as
    soon as the part's last byte is read, while the part's upload ends (a second request
    after the part's took 46 ms of the 1.1 GB benchmark's incr)."""
    key = layout.part_key(name, number)
    map_key = layout.block_map_key(name, number)
    writer = PartWriter(number, files, progress=progress, cancel=cancel, blocks=blocks)
    # (reading and hashing the files runs ahead in a thread of its own)
    plaintext = pipelined(writer.stream(), name=f"walship-read-{number}")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="walship-map") as pool:
        mapped: list[Future[PartEntry]] = []

        def then_the_map() -> Iterator[bytes]:
            yield from plaintext
            if writer.maps:  # (complete: the part's stream has ended)
                assert blocks is not None
                mapped.append(pool.submit(_store_map, archive, map_key, number,
                                          blocks.block_size, writer.maps))

        stored = archive.codec.stored_form(key, then_the_map())
        try:
            archive.storage.put(key, stored, metadata=stored.metadata)
            block_map = mapped[0].result() if mapped else None
        except BaseException:
            if mapped:  # the part failed, or its map: neither is left behind
                wait(mapped)
                _delete_parts(archive, [key, map_key], None)
            raise
    return _StoredPart(PartEntry(number, key, writer.size, stored.size, len(writer.entries),
                                 stored.metadata()[OBJECT_DIGEST_METADATA]),
                       tuple(writer.entries), tuple(writer.skipped), block_map)


def _store_map(archive: Archive, key: str, number: int, block_size: int,
               maps: Sequence[block_delta.FileMap]) -> PartEntry:
    """Store the block map of part ``number`` (its large relation files' ``maps``)."""
    data = block_delta.encode_map(block_size, number, list(maps))
    form = archive.codec.stored_form(key, [data], size_hint=len(data))
    archive.storage.put(key, form, metadata=form.metadata)
    return PartEntry(number, key, len(data), form.size, len(maps),
                     form.metadata()[OBJECT_DIGEST_METADATA])


def _store_parts(archive: Archive, name: str, plan: list[list[SourceFile]], parallel: int,
                 progress: Callable[[int], None] | None,
                 stored: list[_StoredPart],
                 blocks_for: Callable[[list[SourceFile]], BlockContext] | None = None
                 ) -> None:
    """Store every planned part, ``parallel`` at a time; stop them all at the first failure.

    ``blocks_for(files)``, called here in part order (it reads the parent's block maps as
    one stream), gives each part its block context; at most ``parallel`` parts are handed out
    at a time, so that only their maps are held."""
    cancel = threading.Event()
    slots = threading.Semaphore(max(1, parallel))
    futures: list[Future[_StoredPart]] = []
    try:
        _submit_parts(archive, name, plan, parallel, progress, blocks_for, cancel, slots,
                      futures)
    finally:  # (what was stored is known to the caller, to delete it on failure)
        stored.extend(f.result() for f in futures
                      if f.done() and not f.cancelled() and not f.exception())
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception()]
    if errors:
        real = [e for e in errors if not isinstance(e, Cancelled)]
        raise (real or errors)[0]  # type: ignore[misc]


def _submit_parts(archive: Archive, name: str, plan: list[list[SourceFile]], parallel: int,
                  progress: Callable[[int], None] | None,
                  blocks_for: Callable[[list[SourceFile]], BlockContext] | None,
                  cancel: threading.Event, slots: threading.Semaphore,
                  futures: list[Future[_StoredPart]]) -> None:
    with ThreadPoolExecutor(max_workers=max(1, parallel),
                            thread_name_prefix="walship-part") as pool:
        try:
            for number, files in enumerate(plan, 1):
                while not slots.acquire(timeout=0.05):
                    if any(f.done() and f.exception() is not None for f in futures):
                        break
                if any(f.done() and f.exception() is not None for f in futures):
                    break
                context = blocks_for(files) if blocks_for is not None else None
                future = pool.submit(store_part, archive, name, number, files,
                                     progress=progress, cancel=cancel, blocks=context)
                future.add_done_callback(lambda _: slots.release())
                futures.append(future)
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:
            if not all(f.done() and f.exception() is None for f in futures):
                cancel.set()  # a failure or an interrupt: stop every part in flight
                for future in futures:
                    future.cancel()
        wait(futures)


def choose_parent(manifests: Sequence[Manifest], backup_type: str, info: ServerInfo
                  ) -> tuple[Manifest | None, str]:
    """The parent of a ``backup_type`` backup of the server ``info`` describes, among the
    complete backups ``manifests``; ``(None, why)`` when a full backup must be taken."""
    if backup_type == FULL:
        return None, ""
    if backup_type not in (DIFF, INCR):
        raise UsageError(f"unknown backup type {backup_type!r}", "use full, diff or incr")
    usable = catalog.usable_chains(manifests)
    if backup_type == DIFF:
        usable = [m for m in usable if m.backup_type == FULL]
    if not usable:
        return None, "the repository holds no usable " + ("full " if backup_type == DIFF
                                                           else "") + "backup"
    newest = max(usable, key=lambda m: (m.start_time, layout.sort_key(m.name)))
    if newest.system_identifier != info.system_identifier:
        return None, (f"the newest backup {newest.name} comes from another cluster (system "
                      f"identifier {newest.system_identifier})")
    if newest.pg_major != info.major:
        return None, (f"the newest backup {newest.name} comes from PostgreSQL "
                      f"{newest.pg_major}, the server runs {info.major}")
    if info.timeline == 0:
        return None, "the server's timeline cannot be read (pg_control_checkpoint)"
    if newest.timeline != info.timeline:
        return None, (f"the newest backup {newest.name} was taken on timeline "
                      f"{newest.timeline}, the server is on {info.timeline}")
    return newest, ""


def _hash_file(disk: str, size: int, cancel: threading.Event
               ) -> tuple[int, int, float, str] | None:
    """(size, mode, mtime, SHA-256) of the file at ``disk`` read now, when it still has
    ``size`` bytes; None if it vanished or its size is not ``size``. Stops (Cancelled) once
    ``cancel`` is set."""
    try:
        fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise UsageError(f"cannot read {disk}", os.strerror(error.errno or 0),
                         "run backup-push as the cluster's OS user (postgres)") from None
    try:
        st = os.fstat(fd)
        if st.st_size != size:
            return None
        digest = hashlib.sha256()
        read = 0
        while read < size:
            if cancel.is_set():
                raise Cancelled(f"hashing {disk} cancelled")
            chunk = os.read(fd, min(1 << 20, size - read))
            if not chunk:
                return None  # shrank while read: store it (as a full backup would)
            digest.update(chunk)
            read += len(chunk)
    finally:
        os.close(fd)
    return size, st.st_mode & 0o7777, st.st_mtime, digest.hexdigest()


def _hash_files(files: Sequence[tuple[str, int]], cancel: threading.Event
                ) -> list[tuple[int, int, float, str] | None]:
    """:func:`_hash_file` of each ``(disk, size)``, in order."""
    return [_hash_file(disk, size, cancel) for disk, size in files]


def _batches(files: Sequence[SourceFile], most_bytes: int = 4 << 20, most_files: int = 32
             ) -> list[list[SourceFile]]:
    """``files`` in consecutive groups of at most ``most_files`` files or about
    ``most_bytes`` bytes: one task of the hashing pool each (a task per file cost more than
    hashing most of them: a cluster holds thousands of small files)."""
    batches: list[list[SourceFile]] = []
    current: list[SourceFile] = []
    filled = 0
    for source in files:
        if current and (len(current) == most_files or filled + source.size > most_bytes):
            batches.append(current)
            current, filled = [], 0
        current.append(source)
        filled += source.size
    if current:
        batches.append(current)
    return batches


def unchanged_files(files: Sequence[SourceFile], parent: Manifest, parallel: int = 3
                    ) -> tuple[list[SourceFile], list[FileEntry], dict[tuple[str, int], PartEntry]]:
    """Split ``files`` into those to store and the entries of those unchanged since
    ``parent``, with the parts those entries reference.

    A file is unchanged only if its content, read now (during this backup), has the size and
    the SHA-256 of the parent's entry: the stored bytes are then exactly the bytes a full
    backup would have stored. Its size and time alone are never trusted."""
    held = {("", p.number): replace(p, backup=parent.name) for p in parent.parts}
    held.update({(p.backup, p.number): p for p in parent.referenced_parts})
    previous = {f.path: f for f in parent.files}
    candidates = [f for f in files if f.content is None and f.path in previous
                  and previous[f.path].size == f.size]
    cancel = threading.Event()
    batches = _batches(candidates)
    with ThreadPoolExecutor(max_workers=max(1, parallel),
                            thread_name_prefix="walship-hash") as pool:
        futures = [pool.submit(_hash_files, [(f.disk, previous[f.path].size) for f in batch],
                               cancel) for batch in batches]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:  # a failure or an interrupt (SIGTERM): stop every file in flight
            if not all(f.done() and f.exception() is None for f in futures):
                cancel.set()
                for future in futures:
                    future.cancel()
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception()]
    if errors:
        real = [e for e in errors if not isinstance(e, Cancelled)]
        raise (real or errors)[0]  # type: ignore[misc]
    hashed = {source.path: found for batch, future in zip(batches, futures, strict=True)
              for source, found in zip(batch, future.result(), strict=True)}
    store: list[SourceFile] = []
    same: list[FileEntry] = []
    parts: dict[tuple[str, int], PartEntry] = {}
    for source in files:
        found = hashed.get(source.path)
        old = previous.get(source.path)
        # (a parent's file rebuilt from block pieces is never a plain reference: its holder
        # has only the base)
        if found is None or old is None or old.pieces or (found[0], found[3]) != (
                old.size, old.sha256):
            store.append(source)
            continue
        holder = old.backup or parent.name
        part = held[(old.backup, old.part)]
        parts[(holder, old.part)] = part
        same.append(FileEntry(source.path, found[0], found[1], found[2], found[3], old.part,
                              holder))
    return store, same, parts


WAL_SUMMARY_VERSION = 170000  # PostgreSQL 17: the first with WAL summaries


def wal_summary_source(source: BackupSource, info: ServerInfo, parent: Manifest,
                       start_lsn: wal.Lsn, pgdata: str, log: Log | None, *,
                       archive: Archive | None = None, budget: int | None = None,
                       scanner: object | None = None) -> block_delta.ChangeSource | None:
    """A change source from the WAL since the parent: the server's WAL summaries
    (:mod:`walship.backup.walsummary`, PostgreSQL 17+ with ``summarize_wal = on``), else the
    WAL itself, read from pg_wal or ``archive`` (:mod:`walship.backup.walscan`, at most
    ``budget`` bytes of it; ``scanner``: a :class:`walship.backup.walscan.WalScanner` that
    has read part of the range already, from :func:`wal_prescan`); or None (then every block
    of a large file is read and compared; the log says why).

    The range is from the PARENT'S START LSN to THIS BACKUP'S START LSN. The parent copied its
    files at some moment during its run, so a block modified after its start may be in the
    parent as it was before or after that change: only a block that no WAL record since the
    parent's start names is certainly what the parent holds (the checkpoint that began the
    parent had flushed every earlier change). Starting at the parent's stop would miss a block
    changed after the parent read it and before its stop. Changes after this backup's start
    are repaired by replaying WAL from this backup's start, as for any online backup."""
    if not info.timeline:
        return None
    prefixed = ((lambda line: log(f"backup-push: {line.removeprefix('walship: ')}"))
                if log is not None else None)
    scan = getattr(source, "wal_scan_changes", None)
    changes = None
    summaries = getattr(source, "wal_summary_changes", None)
    if summaries is not None and info.version >= WAL_SUMMARY_VERSION:
        changes = summaries(timeline=info.timeline, since_lsn=parent.start_lsn,
                            until_lsn=start_lsn, parent_timeline=parent.timeline,
                            parent_stop_lsn=parent.stop_lsn,
                            system_identifier=parent.system_identifier, log=prefixed,
                            instead="reading the WAL instead" if scan is not None
                            else "reading and comparing every file")
        if changes is not None and log is not None:
            log(f"backup-push: WAL summaries used: {changes.block_count} blocks of "
                f"{changes.fork_count} relation forks changed from the parent's start "
                f"{parent.start_lsn} to {start_lsn} ({changes.summaries} summaries); only "
                "those are read and compared in the large relation files")
    if changes is None and scanner is not None:
        from walship.backup.walscan import changed_blocks

        changes = changed_blocks(None, until_lsn=start_lsn, scanner=scanner,  # type: ignore[arg-type]
                                 log=prefixed)
    elif changes is None and scan is not None:
        changes = scan(until_lsn=start_lsn, log=prefixed,
                       **_scan_arguments(info, parent, pgdata, archive, budget))
    if changes is None:
        return None

    def changed(path: str) -> block_delta.ChangedBlocks | None:
        try:  # the size now: the blocks the summaries name past it are gone (truncated since)
            size = os.stat(os.path.join(pgdata, path)).st_size
        except OSError:
            return None
        found = changes.file_changes(path, size)
        if found is None:
            return None
        limit = found.limit
        return block_delta.ChangedBlocks(
            frozenset(b for b in found.blocks if limit is None or b < limit), limit)

    return changed


def _scan_arguments(info: ServerInfo, parent: Manifest, pgdata: str, archive: Archive | None,
                    budget: int | None) -> dict[str, object]:
    """The arguments of a :class:`walship.backup.walscan.WalScanner` for this backup."""
    return {"pg_wal": os.path.join(pgdata, "pg_wal"),
            "fetch": archive.wal_chunks if archive is not None else None,
            "timeline": info.timeline, "since_lsn": parent.start_lsn,
            "wal_segment_size": info.wal_segment_size, "parent_timeline": parent.timeline,
            "system_identifier": parent.system_identifier, "budget": budget}


def wal_prescan(source: BackupSource, info: ServerInfo, parent: Manifest | None, pgdata: str,
                archive: Archive, log: Log | None) -> object | None:
    """Before ``pg_backup_start``, on a primary without WAL summaries (PostgreSQL before 17,
    or 17+ with ``summarize_wal`` off): a :class:`walship.backup.walscan.WalScanner` that has
    read the WAL from the parent's start to the server's flush position, while it is still in
    pg_wal (the backup's starting checkpoint recycles the segments before it, which would then
    be fetched from the repository). None when there is nothing to scan for. The budget is
    the parent's large relation files' size."""
    make = getattr(source, "wal_scanner", None)
    flush = getattr(source, "flush_lsn", None)
    if (make is None or flush is None or parent is None or info.in_recovery
            or not info.timeline or parent.block_size != info.block_size):
        return None
    if info.version >= WAL_SUMMARY_VERSION:
        summarizes = getattr(source, "summarizes_wal", None)
        try:
            if summarizes is None or summarizes():
                return None  # (the summaries are asked first, after the start)
        except WalshipError:
            return None
    budget = sum(entry.size for entry in parent.files
                 if block_delta.eligible(entry.path, entry.size))
    scanner = make(**_scan_arguments(info, parent, pgdata, archive, budget))
    try:
        position = flush()
    except WalshipError as error:  # (then the whole range is read after the start)
        if log is not None:
            log(f"backup-push: the WAL is read after the backup's start: {error.one_line()}")
        return scanner
    scanner.read(position, complete_only=True)
    return scanner


def _block_contexts(archive: Archive, parent: Manifest | None, eligible: frozenset[str],
                    block_size: int, changed: block_delta.ChangeSource | None
                    ) -> Callable[[list[SourceFile]], BlockContext]:
    """The block context of each part, in part order: the parent's map and pieces of each of
    its large relation files, read from the parent's block maps as one stream."""
    maps = block_delta.ParentMaps(archive, parent) if parent is not None else None
    previous = {f.path: f for f in parent.files} if parent is not None else {}

    def context(files: list[SourceFile]) -> BlockContext:
        paths = [f.path for f in files if f.path in eligible]
        parents: dict[str, ParentFile] = {}
        if maps is not None and parent is not None:
            for path in paths:
                found = maps.take(path)
                entry = previous.get(path)
                if found is not None and entry is not None and found.size == entry.size:
                    parents[path] = ParentFile(found, _pieces_of(parent, entry))
        return BlockContext(block_size, frozenset(paths), parents, changed)

    return context


def _pieces_of(parent: Manifest, entry: FileEntry) -> tuple[Piece, ...]:
    """The pieces rebuilding the parent's ``entry``, their holders named absolutely."""
    if entry.pieces:
        return tuple(replace(p, backup=p.backup or parent.name) for p in entry.pieces)
    return (Piece(entry.backup or parent.name, entry.part, PIECE_FILE, entry.size,
                  entry.sha256),)


def _referenced(parent: Manifest | None, files: Sequence[FileEntry]
                ) -> dict[tuple[str, int], PartEntry]:
    """The parts of older backups that ``files`` read (whole files and block pieces)."""
    if parent is None:
        return {}
    held = {(parent.name, p.number): replace(p, backup=parent.name) for p in parent.parts}
    held.update({(p.backup, p.number): p for p in parent.referenced_parts})
    out: dict[tuple[str, int], PartEntry] = {}
    for entry in files:
        for holder in {entry.holder, *(p.holder for p in entry.pieces)}:
            if holder[0]:
                if holder not in held:
                    raise IntegrityError(f"file {entry.path} refers to part {holder[1]} of "
                                         f"{holder[0]}, which the parent does not list")
                out[holder] = held[holder]
    return out


def _read_pg_control(path: str) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read()
    if len(data) != 8192:
        raise IntegrityError(f"{path} has {len(data)} bytes", "pg_control is 8192 bytes")
    return data


def _check_same_cluster(pgdata: str, info: ServerInfo) -> None:
    """Refuse a data directory on this machine that is not the connected server's."""
    import sys

    with open(Path(pgdata, PG_CONTROL), "rb") as handle:
        local = int.from_bytes(handle.read(8), sys.byteorder)  # ControlFileData.system_identifier
    if str(local) != info.system_identifier:
        raise UsageError(f"the data directory {pgdata} on this machine is not the connected "
                         "server's", f"its system identifier is {local}, the server's "
                         f"{info.system_identifier}", "run backup-push on the database server "
                         "and connect to the local server (PGHOST, --dbname)")


def _wal_range(stop: StopResult, start_lsn: wal.Lsn, info: ServerInfo
               ) -> tuple[int, wal.Lsn, str, str, bool]:
    """Timeline, start LSN, start and stop segment names, and whether it came from a standby."""
    fields = parse_backup_label(stop.backup_label)
    start_wal = ""
    location = fields.get("START WAL LOCATION", "")
    if "(file " in location:
        lsn_text, _, rest = location.partition(" (file ")
        start_lsn = wal.Lsn.parse(lsn_text)
        start_wal = rest.rstrip(")").strip()
    size = info.wal_segment_size
    if not start_wal:
        raise IntegrityError("pg_backup_stop returned an unreadable backup_label",
                             stop.backup_label[:200])
    timeline = int(fields.get("START TIMELINE", "0")) or wal.parse_name(start_wal).timeline
    start_number = start_lsn.segment_number(size)
    # The last segment needed holds the byte before the stop LSN (XLByteToPrevSeg).
    stop_number = max(start_number, (stop.lsn.value - 1) // size)
    return (timeline, start_lsn, wal.segment_name(timeline, start_number, size),
            wal.segment_name(timeline, stop_number, size),
            fields.get("BACKUP FROM", "primary") == "standby")


def _owner(path: str) -> tuple[str, str, int]:
    import grp
    import pwd

    st = os.stat(path)
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return user, group, st.st_mode & 0o7777


def push_backup(archive: Archive, source: BackupSource, *, parallel: int = 3,
                part_size: int = DEFAULT_PART_SIZE, fast: bool = True,
                progress: Progress | None = None, log: Log | None = None,
                wal_timeout: float | None = None, backup_type: str = FULL,
                changed_blocks: block_delta.ChangeSource | None = None) -> PushResult:
    """Take a base backup of the server behind ``source`` into ``archive``'s repository;
    ``backup_type`` full, diff or incr (see the module docstring). ``changed_blocks(path)``,
    when given, says which blocks of a large relation file may have changed since the parent
    (None for a file it does not cover: read and compared whole).

    On a primary the manifest is written once the WAL the backup needs is in the repository,
    or after ``wal_timeout`` seconds (default :data:`WAL_TIMEOUT`) with a warning: the backup
    is then listed with its WAL missing, and restored only once the WAL arrives."""
    started = time.monotonic()
    info = source.describe()
    if not info.in_recovery and info.archive_mode == "off":
        raise UsageError("archive_mode is off on this server", "a base backup is useless "
                         "without the WAL written while it is taken",
                         "set archive_mode = on and archive_command = 'walship wal-push %p'")
    pgdata = info.data_directory
    if not Path(pgdata, "PG_VERSION").is_file():
        raise UsageError(f"cannot read the data directory {pgdata}",
                         "backup-push reads the files directly from disk",
                         "run it on the database server, as its OS user (postgres)")
    _check_same_cluster(pgdata, info)
    # one repository, one key, one segment size: refused before anything is stored
    archive.check_repository(info.wal_segment_size)
    user, group, data_mode = _owner(pgdata)
    chain = (catalog.newest_chain(archive, (lambda m: m.backup_type == FULL)
                                  if backup_type == DIFF else lambda _: True)
             if backup_type != FULL else [])
    parent, note = choose_parent(chain, backup_type, info)
    if note and log is not None:
        log(f"backup-push: no usable parent for a {backup_type} backup: {note}; taking a full "
            "backup")
    start_time = source.now()
    name = choose_name(archive, start_time)
    label = f"walship backup {name}"
    scanner = (wal_prescan(source, info, parent, pgdata, archive, log)
               if changed_blocks is None else None)
    start_lsn = source.start(label, fast)
    stored: list[_StoredPart] = []
    committed = False
    try:
        content: Scan = scan(pgdata, info.major, info.tablespace_names)
        to_store: list[SourceFile] = list(content.files)
        same: list[FileEntry] = []
        eligible = frozenset(f.path for f in to_store
                             if block_delta.eligible(f.path, f.size))
        with_maps = parent is not None and parent.block_size == info.block_size
        if changed_blocks is None and with_maps and parent is not None:
            changed_blocks = wal_summary_source(
                source, info, parent, start_lsn, pgdata, log, archive=archive,
                budget=sum(f.size for f in to_store if f.path in eligible), scanner=scanner)
        if parent is not None:  # read and hash after the backup started: see unchanged_files
            compared = [f for f in to_store if not (with_maps and f.path in eligible)]
            blockwise = [f for f in to_store if with_maps and f.path in eligible]
            to_store, same, _ = unchanged_files(compared, parent, parallel)
            to_store += blockwise
        to_store.sort(key=lambda f: block_delta.order_key(f.path))
        blocks_for = _block_contexts(archive, parent if with_maps else None, eligible,
                                     info.block_size, changed_blocks)
        plan = plan_parts(to_store, part_size)
        advance = None
        if progress is not None:
            progress.start(sum(f.size for f in to_store))
            advance = progress.advance
        try:
            _store_parts(archive, name, plan, parallel, advance, stored, blocks_for)
        finally:
            if progress is not None:
                progress.finish()
        pg_control = _read_pg_control(content.pg_control)
        # Not PostgreSQL's own wait for the archiver (it looks once a second): on a primary,
        # the repository itself is polled below for the WAL the backup needs.
        stop = source.stop(wait_for_archive=False)
        final = [SourceFile(PG_CONTROL, "", len(pg_control), pg_control),
                 SourceFile(BACKUP_LABEL, "", 0, stop.backup_label.encode())]
        if stop.tablespace_map:
            final.append(SourceFile(TABLESPACE_MAP, "", 0, stop.tablespace_map.encode()))
        stored.append(store_part(archive, name, len(plan) + 1, final))
        timeline, start_lsn, start_wal, stop_wal, from_standby = _wal_range(stop, start_lsn,
                                                                             info)
        stored.sort(key=lambda s: s.part.number)
        files = tuple(sorted([*(f for s in stored for f in s.files), *same],
                             key=lambda f: f.path))
        referenced = _referenced(parent, files)
        manifest = Manifest(
            name=name, label=label, pg_version=info.version,
            system_identifier=info.system_identifier, timeline=timeline,
            start_lsn=start_lsn, stop_lsn=stop.lsn, start_wal=start_wal, stop_wal=stop_wal,
            wal_segment_size=info.wal_segment_size, start_time=start_time,
            stop_time=stop.time, from_standby=from_standby or info.in_recovery,
            data_directory=pgdata, data_mode=data_mode, owner_user=user, owner_group=group,
            tablespaces=content.tablespaces, directories=content.directories,
            links=content.links, files=files, parts=tuple(s.part for s in stored),
            walship_version=__version__,
            backup_type=backup_type if parent is not None else FULL,
            parent=parent.name if parent is not None else None,
            referenced_parts=tuple(sorted(referenced.values(),
                                          key=lambda p: (p.backup, p.number))),
            block_size=info.block_size,
            block_maps=tuple(s.block_map for s in stored if s.block_map is not None))
        manifest.check()
        missing: list[str] | None = None
        if not info.in_recovery:  # a standby's WAL is archived by its primary, in its time
            _push_ready_wal(archive, pgdata, manifest.needed_wal(), log)
            missing = _await_wal(archive, manifest.needed_wal(),
                                 WAL_TIMEOUT if wal_timeout is None else wal_timeout)
        written = catalog.store_manifest(archive, manifest)
        committed = True
    except BaseException:
        source.close()  # ends the session: the server aborts the backup if still running
        if not committed:
            _delete_parts(archive, [s.part.key for s in stored]
                          + [s.block_map.key for s in stored if s.block_map], log)
        raise
    source.close()
    if manifest.parent is not None and log is not None:
        # a delete running meanwhile may have removed the parent (then never used)
        problem = catalog.chain_gone(archive, manifest, chain)
        if problem is not None:
            log(f"backup-push {name}: WARNING: backup {name} ({manifest.backup_type}) cannot "
                f"be restored: its chain is not complete: {problem}; it will never be used: "
                "take a full backup")
    if missing is None:  # (on a primary, known: the segments were waited for one by one)
        missing = catalog.WalIndex(archive).missing(manifest)
    if missing and log is not None:
        log(f"backup-push {name}: WARNING: the WAL it needs is not all archived yet: missing "
            f"{catalog.describe_missing(missing)}; it cannot be restored until it is"
            + (" (taken on a standby: the primary archives it)" if info.in_recovery else
               " (hint: is archive_command 'walship wal-push %p' with this repository?)"))
    return PushResult(manifest, sum(p.size for p in manifest.parts),
                      manifest.stored_size + written.size, time.monotonic() - started,
                      sum(len(s.skipped) for s in stored), tuple(missing),
                      sum(1 for f in manifest.files
                          if f.backup and all(p.backup for p in f.pieces)), note,
                      sum(1 for f in manifest.files
                          if len(f.pieces) > 1 and f.pieces[-1].backup == ""))


WAL_TIMEOUT = 60.0


def _push_ready_wal(archive: Archive, pgdata: str, names: Sequence[str],
                    log: Log | None) -> None:
    """Store the WAL files among ``names`` that PostgreSQL has marked ``.ready`` (complete,
    not archived yet: the segment ``pg_backup_stop`` just switched from), rather than wait
    for the archiver to start ``walship wal-push`` for them: the backup is then complete
    sooner. The archiver's own call later finds identical content and succeeds, as for any
    repeated push. A regular ``.ready`` file only (never a link or FIFO), and the file itself
    is opened as ``wal-push`` opens it. On any failure nothing is lost: the caller waits for
    the archiver as before."""
    status = os.path.join(pgdata, "pg_wal", "archive_status")
    for name in names:
        try:
            if not stat.S_ISREG(os.lstat(os.path.join(status, f"{name}.ready")).st_mode):
                continue
        except OSError:
            continue
        try:
            archive.push_wal(os.path.join(pgdata, "pg_wal", name))
        except (WalshipError, OSError) as error:
            if log is not None:
                log(f"backup-push: {name} left to the archiver: {error}")
            return


def _await_wal(archive: Archive, names: Sequence[str], timeout: float) -> list[str]:
    """Wait until every WAL file in ``names`` is in the repository, or ``timeout`` passes;
    return those still missing. One HEAD per file still missing, every 20 ms at first,
    backing off to 1 s."""
    from walship import layout as wal_layout
    from walship.errors import NotFound

    missing = list(names)
    deadline = time.monotonic() + timeout
    pause = 0.02
    while missing:
        still = []
        for name in missing:
            try:
                archive.storage.head(wal_layout.wal_key(name))
            except NotFound:
                still.append(name)
        missing = still
        if not missing or time.monotonic() + pause > deadline:
            return missing
        time.sleep(pause)
        pause = min(1.0, pause * 1.5)
    return missing


def _delete_parts(archive: Archive, keys: list[str], log: Log | None) -> None:
    """Best effort: remove the parts this failed push stored (only those: a concurrent push
    that chose the same name keeps its own)."""
    for key in keys:
        try:
            archive.storage.delete(key)
        except (WalshipError, OSError) as error:
            if log is not None:
                log(f"backup-push: could not remove {key} of the failed backup: {error}")
            return
