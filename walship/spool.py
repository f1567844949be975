"""The local spool beside pg_wal: records of segments pushed ahead, and the prefetch cache.

Everything here is standard library only and cheap, because it is what a wal-push or wal-fetch
call whose work was done ahead runs *instead of* the full program (see :mod:`walship.fastpath`).

Layout, inside the directory that holds the WAL (``pg_wal/walship/``), so that delivering a
cached segment is a rename within one filesystem::

    pushed/<name>          "<file fingerprint> <settings fingerprint>": <name> is durably stored
    push.lock              held (flock) by the wal-push call that pushes ahead
    prefetch/<name>        a downloaded, verified segment ...
    prefetch/<name>.ok     ... and "<crc32> <size> <settings fingerprint>", written after it
    prefetch/<name>.inflight   the worker is downloading <name>
    prefetch/want          "<name> <segment size>": the segment PostgreSQL asked for last
    prefetch/worker.lock   held (flock) by the one prefetch worker while it runs

A record or cache entry is used only while the *settings fingerprint* (a hash of every
``WALSHIP_*`` and ``AZURE_*`` variable and of the config file's identity) is unchanged, so a
change of repository or key is never answered from work done for the old one. Pushed-ahead files
are trusted only while their size, mtime, inode and the hash of their first and last 8 KiB match.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import zlib

SPOOL = "walship"
CONFIG_FILE = "/etc/walship/walship.toml"
_EDGE = 8192


def spool_dir(wal_dir: str) -> str:
    return os.path.join(wal_dir, SPOOL)


def settings_fingerprint(environ: dict[str, str] | None = None) -> str:
    """Identifies the configuration inputs: identical inputs mean identical settings."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    digest = hashlib.sha256()
    for key in sorted(environ):
        if key.startswith(("WALSHIP_", "AZURE_")):
            digest.update(f"{key}={environ[key]}\0".encode())
    config = environ.get("WALSHIP_CONFIG") or CONFIG_FILE
    try:
        st = os.stat(config)
        digest.update(f"{config}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}".encode())
    except OSError:
        digest.update(b"no config file")
    return digest.hexdigest()[:32]


def file_fingerprint(path: str) -> str:
    """Size, mtime, inode and a hash of the first and last 8 KiB of a WAL file."""
    with open(path, "rb", buffering=0) as handle:
        st = os.fstat(handle.fileno())
        head = handle.read(_EDGE)
        if st.st_size > _EDGE:
            handle.seek(max(_EDGE, st.st_size - _EDGE))
            head += handle.read(_EDGE)
    edge = hashlib.sha256(head).hexdigest()[:16]
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{edge}"


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` (no fsync: spool entries are hints, never the only copy)."""
    temp = f"{path}.tmp{os.getpid()}"
    with open(temp, "w") as handle:
        handle.write(text)
    os.replace(temp, path)


def read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


# -- push records ------------------------------------------------------------------------------
def record_pushed(wal_dir: str, name: str, fingerprint: str, settings: str) -> None:
    directory = os.path.join(spool_dir(wal_dir), "pushed")
    os.makedirs(directory, exist_ok=True)
    write_atomically(os.path.join(directory, name), f"{fingerprint} {settings}\n")


def take_pushed(wal_path: str, settings: str) -> bool:
    """Whether ``wal_path`` was pushed ahead under these settings and is unchanged since.

    The record is consumed: PostgreSQL asks once per file, and a repeated call after a crash
    simply pushes again (an identical push succeeds).
    """
    wal_dir, name = os.path.split(wal_path)
    record = os.path.join(spool_dir(wal_dir), "pushed", name)
    text = read_text(record)
    if text is None:
        return False
    fields = text.split()
    ok = len(fields) == 2 and fields[1] == settings and fields[0] == file_fingerprint(wal_path)
    try:
        os.unlink(record)
    except OSError:
        pass
    return ok


# -- prefetch cache ----------------------------------------------------------------------------
def cache_dir(wal_dir: str) -> str:
    return os.path.join(spool_dir(wal_dir), "prefetch")


def crc32_of(path: str) -> tuple[int, int]:
    """(crc32, size) of a file, read in bounded pieces."""
    crc, size = 0, 0
    buffer = bytearray(1 << 20)  # reused: no allocation per chunk
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            crc = zlib.crc32(view[:count], crc)
            size += count
    return crc, size


def seal_cached(cache: str, name: str, settings: str) -> None:
    """Mark a fully downloaded and verified cache file as deliverable."""
    crc, size = crc32_of(os.path.join(cache, name))
    write_atomically(os.path.join(cache, f"{name}.ok"), f"{crc:08x} {size} {settings}\n")


def drop_cached(cache: str, name: str) -> None:
    for suffix in (".ok", ""):
        try:
            os.unlink(os.path.join(cache, name + suffix))
        except OSError:
            pass


def deliver_cached(cache: str, name: str, destination: str, settings: str) -> int | None:
    """Move a cached segment to ``destination`` if it is sealed and intact; return its size.

    A cached file whose checksum no longer matches is deleted, never delivered.
    """
    seal = read_text(os.path.join(cache, f"{name}.ok"))
    if seal is None:
        return None
    fields = seal.split()
    if len(fields) != 3 or fields[2] != settings:
        drop_cached(cache, name)
        return None
    path = os.path.join(cache, name)
    try:
        crc, size = crc32_of(path)
    except OSError:
        drop_cached(cache, name)
        return None
    if f"{crc:08x}" != fields[0] or str(size) != fields[1]:
        drop_cached(cache, name)
        return None
    os.replace(path, destination)
    try:
        os.unlink(os.path.join(cache, f"{name}.ok"))
    except OSError:
        pass
    return size


def want(cache: str, name: str, segment_size: int) -> None:
    """Tell the prefetch worker which segment PostgreSQL asked for last."""
    write_atomically(os.path.join(cache, "want"), f"{name} {segment_size}\n")


def worker_alive(cache: str) -> bool:
    """Whether a prefetch worker holds its lock."""
    try:
        fd = os.open(os.path.join(cache, "worker.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we may have taken
    return False


def start_worker(cache: str) -> None:
    """Start the prefetch worker, detached, unless one is running."""
    if worker_alive(cache):
        return
    import sys

    # Detached, with no tie to the caller's stdin/stdout/stderr: whoever waits for this call's
    # output (PostgreSQL, a shell pipe) must never wait for the worker.
    devnull = os.open(os.devnull, os.O_RDWR)
    log = os.open(os.path.join(cache, "worker.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                  0o600)
    try:
        os.posix_spawn(sys.executable, [sys.executable, "-m", "walship.prefetch", cache],
                       dict(os.environ), file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0),
                                                       (os.POSIX_SPAWN_DUP2, devnull, 1),
                                                       (os.POSIX_SPAWN_DUP2, log, 2)],
                       setsid=True)
    finally:
        os.close(devnull)
        os.close(log)
