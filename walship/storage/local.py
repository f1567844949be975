"""Local or mounted directory backend (``file:///absolute/path``), the embedded default.

Each object is one file under the repository root, at the path of its key. Its bytes are the
object's data followed by a trailer holding the metadata (JSON), the trailer's length and the
magic ``WSMD``, so data and metadata become visible together, atomically.

A put writes a hidden temporary file (``.tmp.<name>.<random>``) in the target directory, fsyncs
it, then hard-links it to the final name, which fails if the name is taken (no clobbering, no
window in which a partial file is visible), removes the temporary name and fsyncs the directory.
Directories created on the way are fsynced into their parents. Filesystems without hard links
fall back to ``renameat2(RENAME_NOREPLACE)``.

The root directory must exist: a missing root (an unmounted share, a typo) is
:class:`~walship.errors.RepositoryMissing`, never "object not found"; a root that is a file is
a :class:`~walship.errors.ConfigError` that says so.

Run as root in a repository whose root directory belongs to another user (the postgres user),
every file and directory a put creates is given to that user (and the root directory's group),
so that the repository stays readable and writable by the user it belongs to. A put killed
before its link leaves its temporary file behind; now and then (one put in
:data:`SWEEP_ONE_IN`) a put deletes those of its directory older than
:data:`LEFTOVER_SECONDS`, which no put in progress can be (it keeps writing its own).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from walship.errors import (AlreadyExists, ConfigError, NotFound, RepositoryMissing,
                            StorageError, Unavailable)
from walship.redact import mask_url
from walship.storage.base import MetadataSource, ObjectInfo, check_key, check_metadata

_FOOTER = struct.Struct(">I4s")
SWEEP_ONE_IN = 64
LEFTOVER_SECONDS = 3600.0
_MAGIC = b"WSMD"
_READ_SIZE = 1 << 20


def _os_error(error: OSError, what: str) -> Exception:
    """Translate an OSError into walship's storage errors."""
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(what, os.strerror(error.errno or 0),
                            "check the repository directory's owner and permissions")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return Unavailable(what, "no space left on the repository's filesystem",
                           "free space or grow the volume")
    return Unavailable(what, f"{type(error).__name__}: {os.strerror(error.errno or 0)}",
                       "check the repository's filesystem or mount")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_no_clobber(source: Path, target: Path) -> None:
    """Make ``target`` name the file ``source`` names, failing with FileExistsError if taken."""
    try:
        os.link(source, target)
        return
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    import ctypes  # no hard links here: rename without replacing (Linux renameat2)

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_noreplace = -100, 1
    if libc.renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target),
                      rename_noreplace) != 0:
        code = ctypes.get_errno()
        raise FileExistsError(code, os.strerror(code)) if code == errno.EEXIST \
            else OSError(code, os.strerror(code))


def _sweep_leftovers(directory: Path) -> None:
    """Delete the temporary files (``.tmp.*``) that puts killed before their link left in
    ``directory``, once older than :data:`LEFTOVER_SECONDS` (never one a put is writing)."""
    import time

    now = time.time()
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                stem, _, token = entry.name.rpartition(".")
                if not (stem.startswith(".tmp.") and len(token) == 12):
                    continue  # (not a temporary name of put's)
                try:
                    st = entry.stat(follow_symlinks=False)
                    if now - st.st_mtime > LEFTOVER_SECONDS:
                        os.unlink(entry.path)
                except OSError:
                    pass
    except OSError:
        pass


class LocalDownload:
    """Streams an object's data, stopping at the metadata trailer."""

    def __init__(self, info: ObjectInfo, handle: object) -> None:
        self.info = info
        self._file = handle
        self._left = info.size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self._left:
            n = self._left
        chunk = self._file.read(n)  # type: ignore[attr-defined]
        if len(chunk) != n:
            raise Unavailable(f"short read of {self.info.key}", "the file shrank while read")
        self._left -= n
        return chunk

    def close(self) -> None:
        self._file.close()  # type: ignore[attr-defined]

    def __enter__(self) -> LocalDownload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalStorage:
    """A repository in a local or mounted directory."""

    def __init__(self, url: str, options: object = None) -> None:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ConfigError(f"invalid repository URL {mask_url(url)!r}", "a file URL needs "
                              "an absolute path", "write it as file:///absolute/path (three "
                              "slashes)")
        if parts.query or parts.fragment or url.endswith(("?", "#")):
            raise ConfigError(f"invalid repository URL {mask_url(url)!r}", "a file URL has no "
                              "query string or fragment", "write it as file:///absolute/path "
                              "(a ? or # in a directory name as %3F or %23)")
        self.root = Path(unquote(parts.path))
        self.url = f"file://{self.root}"
        self._owner: tuple[int, int] | None = None  # see _owner_of_new_files

    # -- helpers -------------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _root_missing(self, why: str = "") -> Exception:
        """The error for a root that is not a directory: absent (unmounted, a typo), so
        :class:`RepositoryMissing`; or something else, such as a file: a :class:`ConfigError`
        that says so."""
        try:
            mode = os.stat(self.root).st_mode
        except OSError:
            mode = None
        if mode is not None and not stat.S_ISDIR(mode):
            kind = "a regular file" if stat.S_ISREG(mode) else "not a directory"
            return ConfigError(f"repository {self.url} is not a directory",
                               f"{self.root} is {kind}",
                               "point the repository at a directory: file:///absolute/dir")
        return RepositoryMissing(f"repository directory {self.root} does not exist", why,
                                 "create the directory or mount the volume")

    def _missing(self, key: str) -> Exception:
        """The right error for an absent file: NotFound only if the root itself is there."""
        if not self.root.is_dir():
            return self._root_missing("so whether object " + key + " exists cannot be told")
        return NotFound(f"object {key} not found in {self.url}")

    def _open(self, key: str) -> tuple[ObjectInfo, object]:
        try:
            handle = open(self._path(key), "rb")  # noqa: SIM115 - closed by the caller
        except FileNotFoundError:
            raise self._missing(key) from None
        except IsADirectoryError:
            raise NotFound(f"object {key} not found in {self.url}", "it is a directory") from None
        except OSError as error:
            if isinstance(error, NotADirectoryError) and not self.root.is_dir():
                raise self._root_missing() from None
            raise _os_error(error, f"cannot open {key} in {self.url}") from error
        try:
            size = os.fstat(handle.fileno()).st_size
            if size < _FOOTER.size:
                raise ValueError("shorter than its trailer")
            handle.seek(size - _FOOTER.size)
            meta_len, magic = _FOOTER.unpack(handle.read(_FOOTER.size))
            if magic != _MAGIC or meta_len > size - _FOOTER.size:
                raise ValueError("no valid metadata trailer")
            data_len = size - _FOOTER.size - meta_len
            handle.seek(data_len)
            metadata = json.loads(handle.read(meta_len))
            handle.seek(0)
            modified = os.fstat(handle.fileno()).st_mtime
        except (ValueError, OSError) as error:
            handle.close()
            from walship.errors import IntegrityError
            raise IntegrityError(f"object {key} in {self.url} is damaged", str(error),
                                 "restore it from another copy or delete it") from None
        return ObjectInfo(key, data_len, metadata, modified), handle

    # -- the protocol --------------------------------------------------------------------------
    def put(self, key: str, data: Iterable[bytes], *,
            metadata: MetadataSource | None = None) -> ObjectInfo:
        target = self._path(key)
        if not self.root.is_dir():
            raise self._root_missing("walship does not create the repository root")
        if target.exists():  # cheap early answer; the link below is the real check
            raise AlreadyExists(f"object {key} already exists in {self.url}")
        owner = self._owner_of_new_files()
        self._make_parents(target.parent, owner)
        temp = target.parent / f".tmp.{target.name}.{secrets.token_hex(6)}"
        size = 0
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o640)
            try:
                if owner is not None:
                    os.fchown(fd, *owner)
                for chunk in data:
                    size += len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                meta = dict(check_metadata(metadata() if metadata else {}))
                blob = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
                os.write(fd, blob + _FOOTER.pack(len(blob), _MAGIC))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                _link_no_clobber(temp, target)
            except FileExistsError:
                raise AlreadyExists(f"object {key} already exists in {self.url}") from None
        except OSError as error:
            raise _os_error(error, f"cannot store {key} in {self.url}") from error
        finally:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
        _fsync_dir(target.parent)
        if secrets.randbelow(SWEEP_ONE_IN) == 0:
            _sweep_leftovers(target.parent)
        return ObjectInfo(key, size, meta)

    def _owner_of_new_files(self) -> tuple[int, int] | None:
        """The (uid, gid) to give what a put creates: the root directory's, when root writes
        into another user's repository; None (the writer's own) otherwise."""
        if os.geteuid() != 0:
            return None
        if self._owner is None:
            st = os.stat(self.root)
            self._owner = (st.st_uid, st.st_gid)
        return self._owner if self._owner[0] != 0 else None

    def _make_parents(self, directory: Path, owner: tuple[int, int] | None = None) -> None:
        """Create ``directory`` and its missing parents below the root, each fsynced in."""
        if directory.is_dir():
            return
        self._make_parents(directory.parent, owner)
        try:
            os.mkdir(directory, 0o750)
            if owner is not None:
                os.lchown(directory, *owner)
        except FileExistsError:
            return
        except OSError as error:
            raise _os_error(error, f"cannot create {directory}") from error
        _fsync_dir(directory.parent)

    def get(self, key: str) -> LocalDownload:
        info, handle = self._open(key)
        return LocalDownload(info, handle)

    def head(self, key: str) -> ObjectInfo:
        info, handle = self._open(key)
        handle.close()  # type: ignore[attr-defined]
        return info

    def list(self, prefix: str = "", *, limit: int | None = None) -> Iterator[ObjectInfo]:
        if not self.root.is_dir():
            raise self._root_missing()
        if limit is not None and limit <= 0:
            return
        start = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root.joinpath(*start.split("/")) if start else self.root
        listed = 0
        for key in self._walk(base, start):  # lazily: a limit reads no more than it needs
            if key.startswith(prefix):
                try:
                    yield self.head(key)
                except NotFound:  # deleted while listing
                    continue
                listed += 1
                if listed == limit:
                    return

    def _walk(self, directory: Path, rel: str) -> Iterator[str]:
        """Yield the keys below ``directory`` in key order, lazily, one directory at a time."""
        try:
            entries = [e for e in os.scandir(directory) if not e.name.startswith(".")]
        except FileNotFoundError:
            return
        # A directory "a" holds keys "a/...", which sort after "a.b" and before "a0".
        entries.sort(key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name)
        for entry in entries:
            key = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), key)
            else:
                yield key

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as error:
            raise _os_error(error, f"cannot delete {key} from {self.url}") from error
        _fsync_dir(path.parent)

    def close(self) -> None:
        pass
