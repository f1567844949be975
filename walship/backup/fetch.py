"""``backup-fetch``: download a base backup into a data directory, verifying every byte.

Every part is decoded through the codec, its stored bytes checked against the object digest
the manifest records for it, so every byte written is checked against the manifest (parts of
older manifests, which lack that digest, have each file checked against its SHA-256 instead),
and every file's size and place are checked; the parts download ``parallel`` at a time
(:mod:`walship.backup.unpack`, shared with ``backup-verify``; here the sink writes the files).
Tablespaces go to their original location or a remapped one (``pg_tblspc/<oid>`` links and
``tablespace_map`` agree).

What it promises about the directory left behind:

* an empty name (which would mean the current directory) and a place under a file are refused;
  a non-empty data directory is refused unless ``force``, and ``force`` only replaces one
  that looks like a PostgreSQL data directory (``PG_VERSION`` and ``global/``) or what an
  interrupted fetch left (its marker file), never an arbitrary directory; its content is then
  removed without following any symbolic link (a link is removed, never its target); a
  directory with a ``postmaster.pid`` is always refused; a non-empty tablespace location is
  always refused;
* the files PostgreSQL needs to start, ``backup_label``, ``tablespace_map``,
  ``global/pg_control`` and, last, ``PG_VERSION``, are written only once everything else is
  written, verified and made durable (one syncfs per filesystem, else an fsync per file), so
  an interrupted fetch (even ``kill -9``) or a crash never leaves a directory PostgreSQL
  would start on: without ``PG_VERSION`` it refuses to;
* on any failure, everything the fetch created is removed before the error is raised.

Block-delta files are rebuilt in place: the base is written, then each backup's blocks are
written at their offsets (``pwrite``), backup by backup in chain order (see
:func:`walship.backup.unpack.read_parts`); the file is then cut to its final size and read back,
and its size and SHA-256 must be the manifest's, before anything startable is written. The
block maps of the backup and of its whole chain are read and checked first: a damaged or missing
one fails the restore.

Data directories are 0700 with 0600 files (0750/0640 for a cluster initialised with group
access); run as root, the files are given to the owner of the target directory, else to the
cluster's original owner when that user exists here.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from walship.archive import Archive
from walship.backup import catalog
from walship.backup.blocks import check_chain_maps
from walship.backup.manifest import (BACKUP_LABEL, PG_CONTROL, PG_VERSION, TABLESPACE_MAP,
                                     FileEntry, Manifest, PartEntry, format_tablespace_map,
                                     parse_tablespace_map)
from walship.backup.parts import Cancelled
from walship.backup.progress import NullProgress, Progress
from walship.backup.unpack import PartSink, check_rebuilt, read_parts, write_blocks
from walship.errors import IntegrityError, StorageError, UsageError

MARKER = ".walship-incomplete"
# Written last, in this order: PostgreSQL will not start without PG_VERSION.
DEFERRED = (TABLESPACE_MAP, BACKUP_LABEL, PG_CONTROL, PG_VERSION)


@dataclass(frozen=True)
class FetchResult:
    """What a backup-fetch wrote, for its log line."""

    manifest: Manifest
    directory: str
    bytes_in: int  # stored bytes downloaded
    bytes_out: int  # file bytes written
    seconds: float
    tablespaces: Mapping[int, str]  # oid -> where it was restored


@dataclass(frozen=True)
class _Owner:
    uid: int
    gid: int


def parse_tablespace_mapping(values: list[str] | tuple[str, ...]) -> dict[int, str]:
    """``["16384=/new/place", ...]`` -> ``{16384: "/new/place"}``: an OID (a decimal number),
    an absolute path without control characters, each OID and each path at most once."""
    mapping: dict[int, str] = {}
    hint = "write OID=/absolute/new/location; walship backup-list --json shows the " \
           "tablespaces of a backup"
    for value in values:
        shown = ascii(value)
        oid_text, sep, path = value.partition("=")
        if not sep:
            raise UsageError(f"invalid tablespace mapping {shown}", "it has no '='", hint)
        if not re.fullmatch(r"[1-9][0-9]{0,9}", oid_text) or int(oid_text) > 0xFFFFFFFF:
            raise UsageError(f"invalid tablespace mapping {shown}",
                             f"the OID {oid_text!a} is not a number from 1 to 4294967295",
                             hint)
        if not path.startswith("/"):
            raise UsageError(f"invalid tablespace mapping {shown}",
                             "the location is " + ("empty" if not path else "not absolute"),
                             hint)
        if any(char < " " or char == "\x7f" for char in path):
            raise UsageError(f"invalid tablespace mapping {shown}",
                             "the location contains a control character", hint)
        oid, location = int(oid_text), os.path.normpath(path)
        if oid in mapping:
            raise UsageError(f"tablespace {oid} is mapped twice",
                             f"to {mapping[oid]!a} and to {location!a}",
                             "give one --tablespace-map per tablespace")
        if location in mapping.values():
            raise UsageError(f"two tablespaces are mapped to {location!a}",
                             "each tablespace needs its own location", hint)
        mapping[oid] = location
    return mapping


def check_directory(directory: str | os.PathLike[str], *, force: bool = False,
                    what: str = "data directory") -> Path:
    """The absolute path of ``directory`` if a backup may be fetched into it (see the module
    docstring); raise a :class:`UsageError` otherwise. Changes nothing."""
    if not os.fspath(directory):
        raise UsageError(f"no {what} given", "an empty name would mean the current directory",
                         "name the directory to restore into")
    root = Path(os.path.abspath(directory))
    existing = root
    while not os.path.lexists(existing):
        existing = existing.parent
    if existing != root and not existing.is_dir():
        raise UsageError(f"{what} {root} cannot be created",
                         f"{existing} is not a directory", "choose a directory path")
    _Cleanup.check(root, force=force, what=what)
    return root


def _replaceable(path: Path) -> bool:
    """Whether ``--force`` may empty ``path``: it holds what an interrupted walship fetch left
    (its marker), or it looks like a PostgreSQL data directory (``PG_VERSION`` and ``global/``,
    neither a symbolic link)."""
    def lstat_mode(name: str) -> int:
        try:
            return os.lstat(path / name).st_mode
        except OSError:
            return 0

    if stat.S_ISREG(lstat_mode(MARKER)):
        return True
    return stat.S_ISREG(lstat_mode(PG_VERSION)) and stat.S_ISDIR(lstat_mode("global"))


class _Cleanup:
    """Remembers what the fetch created, to remove it all if the fetch fails."""

    def __init__(self) -> None:
        self.trees: list[Path] = []  # created by us: removed whole
        self.emptied: list[Path] = []  # existed (empty or forced): their content is removed

    @staticmethod
    def check(path: Path, *, force: bool, what: str) -> None:
        """Refuse ``path`` unless it is absent, empty, or (``force``) replaceable; change
        nothing (every target is checked before any is touched)."""
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise UsageError(f"{what} {path} is not a directory",
                             "it is " + ("a symbolic link" if path.is_symlink() else "a file"),
                             "name a new or empty directory (no link)")
        try:
            content = sorted(os.listdir(path)) if path.exists() else []
        except OSError as error:
            raise UsageError(f"cannot read {what} {path}", os.strerror(error.errno or 0)
                             ) from None
        if not content:
            return
        if (path / "postmaster.pid").exists():
            raise UsageError(f"{what} {path} holds a running or crashed server "
                             "(postmaster.pid)", "it is never overwritten",
                             "stop the server and remove the directory first")
        if not force:
            hint = ("a previous fetch into it was interrupted; " if MARKER in content
                    else "") + ("choose an empty directory, or pass --force to replace "
                                "its content" if what == "data directory" else
                                "map it to an empty directory with --tablespace-map "
                                "OID=/new/place")
            raise UsageError(f"{what} {path} is not empty", hint=hint)
        if not _replaceable(path):
            raise UsageError(f"{what} {path} is not empty and not a PostgreSQL data directory",
                             "--force only replaces a data directory (PG_VERSION and global/) "
                             "or what an interrupted walship fetch left",
                             "choose an empty directory, or remove its content yourself")

    def prepare(self, path: Path, what: str = "data directory") -> None:
        """Create ``path`` or empty it (it passed :meth:`check`)."""
        if path.exists():
            _remove_content(path)
            self.emptied.append(path)
            return
        top = path
        while not top.parent.exists():
            top = top.parent
        try:
            path.mkdir(parents=True, mode=0o700)
        except OSError as error:
            if os.path.isdir(top):  # (parents=True: part of the way may have been made)
                shutil.rmtree(top, ignore_errors=True)
            raise UsageError(f"cannot create {what} {path}", os.strerror(error.errno or 0),
                             "choose a place where walship may create a directory") from None
        self.trees.append(top)

    def undo(self) -> None:
        for tree in self.trees:
            shutil.rmtree(tree, ignore_errors=True)
        for path in self.emptied:
            try:
                _remove_content(path)
            except OSError:
                pass


def _remove_content(path: Path) -> None:
    """Empty ``path`` without following a symbolic link: the directory itself is opened with
    O_NOFOLLOW, a link in it is unlinked (never its target), and subdirectories are removed
    through file descriptors (shutil.rmtree's walk, which never follows links)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with os.scandir(fd) as entries:
            for entry in list(entries):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.name, dir_fd=fd)
                else:
                    os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)


def _owner_for(target: Path, manifest: Manifest) -> _Owner | None:
    """As root: who the restored files belong to (see the module docstring)."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(target)
        if st.st_uid != 0:
            return _Owner(st.st_uid, st.st_gid)
    except FileNotFoundError:
        pass
    import grp
    import pwd

    try:
        user = pwd.getpwnam(manifest.owner_user)
    except KeyError:
        return None
    try:
        gid = grp.getgrnam(manifest.owner_group).gr_gid
    except KeyError:
        gid = user.pw_gid
    return _Owner(user.pw_uid, gid)


class _Writer(PartSink):
    """Writes verified files into the new data directory (shared by the part workers)."""

    rehash = False  # a part checked against the manifest's digest covers its files
    phased = True  # block deltas applied in chain order

    def __init__(self, root: Path, manifest: Manifest, owner: _Owner | None,
                 progress: Progress, cancel: threading.Event) -> None:
        super().__init__(manifest, progress, cancel)
        self.root = root
        self.owner = owner
        group = bool(manifest.data_mode & 0o050)
        self.file_mode = 0o640 if group else 0o600
        self.dir_mode = 0o750 if group else 0o700
        self.deferred: dict[str, bytes] = {}
        self.unsynced: list[Path] = []

    def sync_written(self, roots: list[Path]) -> None:
        """Make every file written so far durable, before the files that make the directory
        startable are written. One syncfs(2) per filesystem (the data directory's and each
        tablespace's) flushes them in one go, instead of one fsync per file while writing
        (which, measured, made fsync the largest cost of a fetch); where syncfs is missing or
        fails, each file is fsynced."""
        if _syncfs(roots):
            self.unsynced.clear()
            return
        for path in self.unsynced:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.unsynced.clear()

    @property
    def written(self) -> int:
        return self.done

    def own(self, path: Path | str) -> None:
        if self.owner is not None:
            os.chown(path, self.owner.uid, self.owner.gid, follow_symlinks=False)

    def member(self, part: PartEntry, member: tarfile.TarInfo, data: Iterator[memoryview]
               ) -> None:
        entry = self.claim(part, member)
        if entry is None:
            return  # (another backup's part: a file this backup takes from elsewhere)
        import hashlib

        size = 0
        if entry.path in DEFERRED:  # small, and kept until the end: always checked on its own
            content = b"".join(data)
            self.verify(entry, hashlib.sha256(content).hexdigest(), len(content))
            with self._lock:
                self.deferred[entry.path] = content
            self.advance(len(content))
            return
        digest = hashlib.sha256() if self.must_hash(part) else None
        path = self.root / entry.path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, self.file_mode)
        except OSError as error:
            raise StorageError(f"cannot create {path}", os.strerror(error.errno or 0)) from None
        with open(fd, "wb", buffering=0) as out:
            for chunk in data:
                if self.cancel.is_set():
                    raise Cancelled(entry.path)
                if digest is not None:
                    digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
                self.advance(len(chunk))
            # (without its own hash, the file is checked with its part, against the manifest)
            self.verify(entry, digest.hexdigest() if digest is not None else entry.sha256,
                        size)
        os.utime(path, (entry.mtime, entry.mtime))
        self.own(path)
        with self._lock:
            self.unsynced.append(path)  # made durable together by sync_written()

    def apply_blocks(self, entry: FileEntry, index: int,
                     blocks: list[tuple[int, memoryview]]) -> None:
        """Write the blocks of piece ``index`` at their offsets (after every older piece)."""
        create = self.first_blocks(entry, index)
        write_blocks(self.root / entry.path, blocks, self.manifest.block_size, create=create,
                     mode=self.file_mode)

    def finish_blocks(self, parallel: int) -> None:
        """Cut every block-delta file to its final size, read it back and check its size and
        SHA-256 against the manifest (``parallel`` files at a time)."""
        from concurrent.futures import ThreadPoolExecutor

        def finish(entry: FileEntry) -> None:
            path = self.root / entry.path
            check_rebuilt(path, entry, self.manifest.block_size, self.cancel)
            os.utime(path, (entry.mtime, entry.mtime))
            self.own(path)
            with self._lock:
                self.unsynced.append(path)

        rebuilt = self.rebuilt_files()
        if rebuilt:
            with ThreadPoolExecutor(max_workers=max(1, parallel),
                                    thread_name_prefix="walship-rebuild") as pool:
                for _ in pool.map(finish, rebuilt):
                    pass

    def write_small(self, rel: str, content: bytes, mtime: float | None = None) -> None:
        """Write a small file atomically (temporary name, fsync, rename, fsync directory)."""
        path = self.root / rel
        temp = path.with_name(f".{path.name}.walship")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     self.file_mode)
        with open(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        if mtime is not None:
            os.utime(temp, (mtime, mtime))
        self.own(temp)
        os.replace(temp, path)
        _fsync_dir(path.parent)


def _start_flush(roots: list[Path]) -> threading.Thread:
    """Start flushing what is written under ``roots`` to disk while the rebuilt files are read
    back and checked (reads of the page cache: the disk is idle meanwhile). The files the check
    then changes (cut to size, times set) are made durable by the later
    :meth:`_Writer.sync_written`, which finds little left to write. Measured on a 1.1 GB
    full+incr chain: the syncfs after the check took 0.5-0.7 s, as long as the check itself."""
    def flush() -> None:
        try:
            _syncfs(roots)
        except OSError:
            pass  # (only an early start: sync_written makes it durable, or fails loudly)

    thread = threading.Thread(target=flush, name="walship-flush", daemon=True)
    thread.start()
    return thread


def _syncfs(roots: list[Path]) -> bool:
    """syncfs(2) on the filesystem of each of ``roots``; False if not every one succeeded
    (not Linux, or an error: the caller then fsyncs file by file)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return False
    for root in roots:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if syncfs(fd) != 0:
                return False
        finally:
            os.close(fd)
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tablespace_targets(manifest: Manifest, mapping: Mapping[int, str]) -> dict[int, Path]:
    unknown = set(mapping) - {t.oid for t in manifest.tablespaces}
    if unknown:
        known = ", ".join(f"{t.oid} ({t.name or '?'}: {t.location})"
                          for t in manifest.tablespaces) or "none"
        raise UsageError(f"backup {manifest.name} has no tablespace "
                         + ", ".join(map(str, sorted(unknown))), f"its tablespaces: {known}")
    targets = {t.oid: Path(mapping.get(t.oid, t.location)) for t in manifest.tablespaces}
    if len(set(targets.values())) != len(targets):
        raise UsageError("two tablespaces would be restored to the same location")
    return targets


def fetch_backup(archive: Archive, name: str, directory: str | os.PathLike[str], *,
                 tablespace_map: Mapping[int, str] | None = None, force: bool = False,
                 parallel: int = 3, progress: Progress | None = None,
                 manifest: Manifest | None = None,
                 prepare: Callable[[Path, Callable[[str, bytes], None]], None] | None = None,
                 ) -> FetchResult:
    """Restore backup ``name`` (or ``LATEST``) into ``directory``; see the module docstring.

    ``prepare(root, write)`` runs once every file is verified, before the files that make the
    directory startable are written (restore adds its recovery settings there); ``write(rel,
    content)`` writes a file atomically with the right owner and mode.
    """
    started = time.monotonic()
    root = check_directory(directory, force=force)  # before the repository is even asked
    manifest = manifest or catalog.resolve(archive, name)
    catalog.check_chain(archive, manifest)  # a parent missing: refused before anything else
    check_chain_maps(archive, manifest)  # (small; what the next backup will compare against)
    targets = _tablespace_targets(manifest, tablespace_map or {})
    for oid, location in targets.items():
        if not location.is_absolute():
            raise UsageError(f"tablespace {oid} location {location} is not absolute")
        if location == root or root in location.parents or location in root.parents:
            raise UsageError(f"tablespace {oid} location {location} overlaps the data "
                             f"directory {root}", hint="remap it with --tablespace-map")
    owner = _owner_for(root, manifest)
    cleanup = _Cleanup()
    progress = progress or NullProgress()
    writer = _Writer(root, manifest, owner, progress, threading.Event())
    _Cleanup.check(root, force=force, what="data directory")
    for oid, location in targets.items():
        check_directory(location, force=False, what=f"tablespace {oid} location")
    try:
        cleanup.prepare(root)
        for oid, location in targets.items():
            cleanup.prepare(location, f"tablespace {oid} location")
        os.chmod(root, writer.dir_mode)
        writer.own(root)
        writer.write_small(MARKER, f"walship backup-fetch {manifest.name}\n".encode())
        _make_tree(manifest, root, targets, writer)
        progress.start(manifest.size)
        try:
            stored = read_parts(archive, manifest, writer, parallel)
        finally:
            progress.finish()
        missing = writer.missing()
        if missing:
            raise IntegrityError(f"backup {manifest.name} lacks {len(missing)} files its "
                                 f"manifest lists", f"e.g. {sorted(missing)[0]}",
                                 "the repository was tampered with")
        flushing = _start_flush([root, *targets.values()]) if any(
            f.pieces for f in manifest.files) else None
        try:
            writer.finish_blocks(parallel)
        finally:
            if flushing is not None:
                flushing.join()
        for link in manifest.links:
            os.symlink(link.target, root / link.path)
            writer.own(root / link.path)
        writer.sync_written([root, *targets.values()])
        if prepare is not None:
            prepare(root, writer.write_small)
        _write_deferred(manifest, writer, targets)
        for directory_entry in manifest.directories:
            _fsync_dir(root / directory_entry.path)
        _fsync_dir(root)
        os.unlink(root / MARKER)
        _fsync_dir(root)
    except BaseException:
        writer.cancel.set()
        cleanup.undo()
        raise
    return FetchResult(manifest, str(root), stored, writer.written,
                       time.monotonic() - started, {k: str(v) for k, v in targets.items()})


def _make_tree(manifest: Manifest, root: Path, targets: Mapping[int, Path],
               writer: _Writer) -> None:
    """Create every directory and the tablespace links, parents first."""
    links = {f"pg_tblspc/{oid}": location for oid, location in targets.items()}
    directories = sorted(manifest.directories, key=lambda d: d.path.count("/"))
    pending = dict(links)
    for entry in directories:
        for link, location in list(pending.items()):
            if entry.path.startswith(link + "/"):
                if not (root / "pg_tblspc").is_dir():
                    _mkdir(root / "pg_tblspc", writer)
                os.symlink(location, root / link)
                writer.own(root / link)
                os.chmod(location, writer.dir_mode)
                writer.own(location)
                del pending[link]
        _mkdir(root / entry.path, writer)
    for link, location in pending.items():  # a tablespace with no directory of this version
        os.symlink(location, root / link)
        writer.own(root / link)


def _mkdir(path: Path, writer: _Writer) -> None:
    try:
        os.mkdir(path, writer.dir_mode)
    except FileExistsError:
        if path.is_symlink() or not path.is_dir():
            raise
    except OSError as error:
        if error.errno != errno.EEXIST:
            raise StorageError(f"cannot create {path}", os.strerror(error.errno or 0)) from None
    os.chmod(path, writer.dir_mode)
    writer.own(path)


def _write_deferred(manifest: Manifest, writer: _Writer, targets: Mapping[int, Path]) -> None:
    entries = {f.path: f for f in manifest.files}
    for rel in DEFERRED:
        if rel not in writer.deferred:
            continue
        content = writer.deferred[rel]
        if rel == TABLESPACE_MAP:
            try:
                spaces = parse_tablespace_map(content.decode())
            except (UnicodeDecodeError, ValueError) as error:
                raise IntegrityError("the backup's tablespace_map is unreadable",
                                     str(error)) from None
            spaces = {oid: str(targets.get(oid, location)) for oid, location in spaces.items()}
            content = format_tablespace_map(spaces).encode()
        writer.write_small(rel, content, entries[rel].mtime)
