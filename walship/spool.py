"""The local spool beside pg_wal: records of segments pushed ahead, and the prefetch cache.

Everything here is standard library only and cheap, because it is what a wal-push or wal-fetch
call whose work was done ahead runs *instead of* the full program (see :mod:`walship.fastpath`).

Layout, inside the directory that holds the WAL (``pg_wal/walship/``), so that delivering a
cached segment is a rename within one filesystem (with the ``cache_dir`` setting, ``prefetch/``
is ``<cache_dir>/pg_wal-<device>-<inode of pg_wal>/`` instead, see :func:`cache_dir`; on
another filesystem, delivery is a copy and a rename, see :func:`_copy_sealed`)::

    pushed/<name>          "<file fingerprint> <settings fingerprint>": <name> is durably stored
    pushing/<name>         the background pusher is uploading <name>
    push.lock              held (flock) by the wal-push call or the background pusher that
                           pushes ahead
    pusher.lock            held (flock) by the background pusher while it runs
    repository             "<verdict tag> <key id|plain> <segment size>": the repository's
                           marker agreed with these settings and key (walship.repository;
                           read by the full program only)
    prefetch/<name>        a downloaded, verified segment ...
    prefetch/<name>.ok     ... and its seal, "<boot id> <inode> <size> <settings fingerprint>",
                           written after it (see :func:`seal_cached`)
    prefetch/<name>.inflight   the worker is downloading <name> (or has queued it)
    prefetch/<name>.missing    the worker's last attempt found no <name> (calls need not wait)
    prefetch/want          "<name> <segment size>": the segment PostgreSQL asked for last
    prefetch/wake          a FIFO the worker reads: a call writes a byte to it after changing
                           ``want`` or ``ask/`` (see :func:`wake_worker`)
    prefetch/ask/<name>.ask     "<nonce> <settings fingerprint>": a call asks the worker to
                           look <name> up in the repository now ...
    prefetch/ask/<name>.answer  ... and "<nonce> found|missing|error", the worker's answer
    prefetch/worker.lock   held (flock) by the one prefetch worker while it runs

Safety: the spool is used only where nobody but walship's own user can change it, so that
walship never follows a symbolic link it did not make, writes into a directory another user
owns, or deletes what is not its own, even when run as root. pg_wal (which may itself be a
symbolic link: ``initdb --waldir``) must belong to the user running walship and be writable by
nobody else; ``walship/`` and each directory below it must be a real directory (never a
symbolic link), of that user, writable by nobody else (:func:`safe_dir`). Inside such
directories only that user (or root) can create entries, so plain path operations there cannot
be redirected. Where the checks fail (root in the postgres user's pg_wal, a planted link, a
directory of another user) the spool is not used at all: the call transfers the file directly,
creating nothing beside it. No missing directory is created on the way to pg_wal. The native
launcher makes the same checks.

A record or cache entry is used only while the *settings fingerprint* (a hash of every
``WALSHIP_*`` and ``AZURE_*`` variable and of the config file's identity) is unchanged, so a
change of repository or key is never answered from work done for the old one. Pushed-ahead files
are trusted only while their size, mtime, inode and the hash of their first and last 8 KiB match.
"""

from __future__ import annotations

import fcntl
import os
import stat
import sys

TYPE_CHECKING = False  # (not typing's: importing typing costs every call about 6 ms of CPU)
if TYPE_CHECKING:
    from collections.abc import Mapping

try:  # CPython's own SHA-256: hashlib would load OpenSSL, 2 ms of every call
    from _sha256 import sha256  # type: ignore[import-not-found]  # Python 3.11
except ImportError:
    try:
        from _sha2 import sha256  # type: ignore[import-not-found]  # Python 3.12 and newer
    except ImportError:
        from hashlib import sha256

SPOOL = "walship"
HEX_DIGITS = frozenset("0123456789ABCDEF")  # of WAL file names
CONFIG_FILE = "/etc/walship/walship.toml"
_EDGE = 8192


def spool_dir(wal_dir: str) -> str:
    return os.path.join(wal_dir, SPOOL)


# -- safe spool directories --------------------------------------------------------------------
def _private(st: os.stat_result) -> bool:
    """A directory of this process's user that nobody else may write to."""
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def own_dir(path: str) -> bool:
    """Whether ``path`` is a directory, not a symbolic link, of this process's user, writable
    by nobody else: the only kind of directory the spool uses."""
    try:
        return _private(os.lstat(path))
    except OSError:
        return False


def safe_dir(base: str, path: str, *, create: bool = False) -> bool:
    """Whether the directory ``path`` below ``base`` may be used for spool files: ``base``
    (pg_wal; followed if a symbolic link) and every directory from it down to ``path`` are
    :func:`own_dir`-like. With ``create``, the missing directories below ``base`` are made
    (0700); ``base`` itself, and anything above it, never. A few stats: cheap enough for the
    fast path."""
    try:
        if not _private(os.stat(base)):
            return False
    except OSError:
        return False
    prefix = base if base.endswith("/") else base + "/"
    if not path.startswith(prefix):
        return False
    current = base
    for part in path[len(prefix):].split("/"):
        if part in ("", ".", ".."):
            return False
        current = os.path.join(current, part)
        if create:
            try:
                os.mkdir(current, 0o700)
            except FileExistsError:
                pass
            except OSError:
                return False
        if not own_dir(current):
            return False
    return True


def refusal(wal_dir: str) -> str | None:
    """For the full program's log when :func:`safe_dir` said no: why an existing spool is left
    alone (None when there is none: nothing worth a line)."""
    path = spool_dir(wal_dir)
    if not os.path.lexists(path):
        return None
    return (f"{path} not used (it, and the pg_wal it is in, must be directories of this user "
            "that nobody else may write to, and never symbolic links): transferring directly")


def regular_file(path: str) -> bool:
    """Whether ``path`` (followed if a symbolic link) is a regular file: a FIFO, a device or a
    directory is never opened, so a call can never block on one."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def settings_fingerprint(environ: dict[str, str] | None = None) -> str:
    """Identifies the configuration inputs: identical inputs mean identical settings."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    digest = sha256()
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
    """Size, mtime, inode and a hash of the first and last 8 KiB of a WAL file. Raises
    OSError for anything but a regular file (opened without blocking: a FIFO never hangs)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        head = os.read(fd, _EDGE)
        if st.st_size > _EDGE:
            head += os.pread(fd, _EDGE, max(_EDGE, st.st_size - _EDGE))
    finally:
        os.close(fd)
    edge = sha256(head).hexdigest()[:16]
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{edge}"


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` (no fsync: spool entries are hints, never the only copy)."""
    temp = f"{path}.tmp{os.getpid()}"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        with open(fd, "w") as handle:
            handle.write(text)
        os.replace(temp, path)
    except BaseException:  # (a full filesystem, or SIGTERM: walship.errors.Terminated)
        try:
            os.unlink(temp)  # (no empty or partial temporary file is left behind)
        except OSError:
            pass
        raise


def read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


# -- push records ------------------------------------------------------------------------------
def record_pushed(wal_dir: str, name: str, fingerprint: str, settings: str) -> None:
    directory = os.path.join(spool_dir(wal_dir), "pushed")
    if not safe_dir(wal_dir, directory, create=True):
        raise OSError(f"{directory} is not a private directory of this user")
    write_atomically(os.path.join(directory, name), f"{fingerprint} {settings}\n")


def _flock_held(path: str) -> bool:
    """Whether some process holds an flock on ``path``."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we may have taken
    return False


def take_lock(fd: int) -> bool:
    """Take the flock of a helper process (worker, pusher) on ``fd``; False if another process
    holds it. A liveness probe (:func:`_flock_held`) holds it for microseconds, so a refusal
    is tried again for a moment before it is believed."""
    import time

    for _ in range(10):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.005)
    return False


def pusher_alive(wal_dir: str) -> bool:
    """Whether a background pusher (``python -m walship.pushahead``) runs for this pg_wal."""
    return _flock_held(os.path.join(spool_dir(wal_dir), "pusher.lock"))


def await_pushed(wal_dir: str, name: str) -> None:
    """Wait while the background pusher is uploading ``name`` (its ``pushing/<name>`` marker,
    written before the upload starts and removed after its record is written)."""
    marker = os.path.join(spool_dir(wal_dir), "pushing", name)
    if not os.path.exists(marker) or not pusher_alive(wal_dir):
        return
    import time

    limit = wait_limit(WAIT_SECONDS)
    started = checked = time.monotonic()
    while os.path.exists(marker):
        now = time.monotonic()
        if now - started > limit:
            return
        if now - checked > 0.05:
            if not pusher_alive(wal_dir):
                return
            checked = now
        time.sleep(0.002)


def await_taken_up(wal_dir: str, name: str, seconds: float) -> bool:
    """Wait up to ``seconds`` for the background pusher to start uploading ``name`` (its
    ``pushing/<name>`` marker) or to have recorded it; False if it does not, or dies."""
    import time

    root = spool_dir(wal_dir)
    marker = os.path.join(root, "pushing", name)
    record = os.path.join(root, "pushed", name)
    deadline = checked = time.monotonic()
    deadline += wait_limit(seconds)
    while not (os.path.exists(marker) or os.path.exists(record)):
        now = time.monotonic()
        if now > deadline:
            return False
        if now - checked > 0.05:
            if not pusher_alive(wal_dir):
                return os.path.exists(marker) or os.path.exists(record)
            checked = now
        time.sleep(0.002)
    return True


def start_pusher(wal_dir: str) -> None:
    """Start the background pusher for this pg_wal, detached, unless one is running."""
    if pusher_alive(wal_dir):
        return
    spawn_detached("walship.pushahead", os.path.abspath(wal_dir),
                   os.path.join(spool_dir(wal_dir), "pusher.log"))


# glibc's malloc returns freed memory to the kernel as soon as the top of its heap holds more
# than 128 KiB, and serves buffers of 128 KiB and more by mmap: a helper that moves every
# segment through the same few buffers of up to 1 MiB (the HTTP reads, zstd's output) faulted
# in fresh pages for each. Measured in a lab (40 segments downloaded from Azurite by one
# thread, three runs each way): 732 page faults per segment without these tunables, 1 with;
# system CPU 4.3-13.5 ms per segment without, 3.3-3.4 ms with (the most on a VM whose host
# takes back the memory its guest frees). Helpers live for minutes: they keep their heap.
MALLOC_TUNABLES = ("glibc.malloc.trim_threshold=16777216", "glibc.malloc.mmap_threshold=4194304")


def helper_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of a detached helper: the caller's, with :data:`MALLOC_TUNABLES` added to
    ``GLIBC_TUNABLES`` where the caller's does not set them (other C libraries ignore it)."""
    env = dict(environ)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.split("=", 1)[0] for t in tunables}
    tunables += [t for t in MALLOC_TUNABLES if t.split("=", 1)[0] not in names]
    env["GLIBC_TUNABLES"] = ":".join(tunables)
    return env


def spawn_detached(module: str, argument: str, log_path: str) -> None:
    """Start ``python -m module argument`` in its own session, stderr to ``log_path``, with no
    tie to the caller's stdin/stdout/stderr: whoever waits for this call's output
    (PostgreSQL, a shell pipe) must never wait for the helper."""
    import sys

    devnull = os.open(os.devnull, os.O_RDWR)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o600)
    try:
        os.posix_spawn(sys.executable, [sys.executable, "-m", module, argument],
                       helper_environment(os.environ),
                       file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0),
                                     (os.POSIX_SPAWN_DUP2, devnull, 1),
                                     (os.POSIX_SPAWN_DUP2, log, 2)],
                       setsid=True)
    finally:
        os.close(devnull)
        os.close(log)


def take_pushed(wal_path: str, settings: str) -> bool:
    """Whether ``wal_path`` was pushed ahead under these settings and is unchanged since.

    A file the background pusher is uploading right now is waited for. The record is
    consumed: PostgreSQL asks once per file, and a repeated call after a crash simply pushes
    again (an identical push succeeds).
    """
    wal_dir, name = os.path.split(wal_path)
    wal_dir = wal_dir or "."
    records = os.path.join(spool_dir(wal_dir), "pushed")
    if not safe_dir(wal_dir, spool_dir(wal_dir)):
        return False  # no records, or none walship may trust (see the module docstring)
    record = os.path.join(records, name)
    if not os.path.exists(record):
        await_pushed(wal_dir, name)
    text = read_text(record) if safe_dir(wal_dir, records) else None
    if text is None:
        return False
    fields = text.split()
    try:
        ok = len(fields) == 2 and fields[1] == settings \
            and fields[0] == file_fingerprint(wal_path)
    except OSError:
        ok = False  # gone, or not a regular file
    try:
        os.unlink(record)
    except OSError:
        pass
    return ok


# -- prefetch cache ----------------------------------------------------------------------------
def cache_dir(wal_dir: str, configured: str | None = None) -> str:
    """The prefetch cache of the WAL directory ``wal_dir``: ``<wal_dir>/walship/prefetch``; or,
    with the ``cache_dir`` setting (``configured``), a directory of its own in there named
    after the device and inode of ``wal_dir``: clusters sharing the setting never share a
    cache, and a restore into a new directory starts with an empty one. (The native launcher
    computes the same name.)"""
    if not configured:
        return os.path.join(spool_dir(wal_dir), "prefetch")
    st = os.stat(wal_dir)
    return os.path.join(configured, f"pg_wal-{st.st_dev:x}-{st.st_ino:x}")


def configured_cache_dir() -> str | None:
    """The ``cache_dir`` setting, read without the full program, as the native launcher reads
    it: ``WALSHIP_CACHE_DIR`` when set and not empty, else the config file's, which is parsed
    only when it mentions the setting at all (the launcher hands such calls to Python). None:
    unset (the cache is beside pg_wal). Raises ValueError when it cannot be told."""
    value = os.environ.get("WALSHIP_CACHE_DIR")
    if value:
        if not value.startswith("/"):
            raise ValueError("WALSHIP_CACHE_DIR is not an absolute path")
        return value
    path = os.environ.get("WALSHIP_CONFIG") or CONFIG_FILE
    try:
        with open(path, "rb") as handle:
            text = handle.read()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ValueError(str(error)) from None
    if b"cache_dir" not in text:
        return None
    import tomllib

    try:
        value = tomllib.loads(text.decode()).get("cache_dir")
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(str(error)) from None
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("cache_dir is not an absolute path")
    return value


# A sealed cache file's mtime: a date no write can produce. Whatever changes the file's content
# through the kernel (write, truncate, a write through mmap, even with the same size and inode)
# moves its mtime to the present, so a file still carrying this mtime is exactly what the worker
# verified and wrote.
SEALED_MTIME_NS = 1_000_000_000  # 1970-01-01 00:00:01 UTC


def boot_id() -> str:
    """This boot's identifier ("" where the kernel does not tell)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def seal_cached(cache: str, name: str, settings: str,
                notes: list[str] | tuple[str, ...] = ()) -> None:
    """Mark the verified cache file ``name`` as deliverable.

    ``notes``: one-line warnings of the worker (a fall-over to a mirror) for the call that
    delivers the file to print (:func:`deliver_cached`), each on a line of its own after the
    seal's (the native launcher, finding more than the seal's four fields, hands the call to
    Python, which prints them: a normal seal costs nothing more).

    The seal records the boot, the file's inode and size, and stamps the file with
    :data:`SEALED_MTIME_NS`. Delivery trusts the file only while all of them still hold, which
    costs a stat instead of reading 16 MiB again: a file changed in any way since has another
    mtime, and after a crash of the machine (a new boot id), when unflushed writes may have been
    lost, the cache is not trusted at all and its segments are downloaded again.
    """
    path = os.path.join(cache, name)
    os.utime(path, ns=(SEALED_MTIME_NS, SEALED_MTIME_NS))
    st = os.stat(path)
    boot = boot_id() or "-"
    write_atomically(os.path.join(cache, f"{name}.ok"),
                     f"{boot} {st.st_ino} {st.st_size} {settings}\n"
                     + "".join(f"{NOTE} {' '.join(note.split())}\n" for note in notes))


NOTE = "note"  # (the first word of a note's line in a seal)


def seal_notes(seal: str | None) -> list[str]:
    """The notes a seal's text carries (:func:`seal_cached`)."""
    if not seal or seal.count("\n") < 2:
        return []
    return [line[len(NOTE) + 1:] for line in seal.splitlines()[1:]
            if line.startswith(f"{NOTE} ")]


def intact(cache: str, name: str, settings: str) -> int | None:
    """The size of the cache file ``name`` if its seal holds (see :func:`seal_cached`)."""
    checked = _unbroken(cache, name, settings)
    return None if checked is None else checked[0]


def _unbroken(cache: str, name: str, settings: str) -> tuple[int, str] | None:
    """The size of the cache file ``name`` and its seal's text, if the seal holds."""
    seal = read_text(os.path.join(cache, f"{name}.ok"))
    fields = seal.partition("\n")[0].split() if seal else []
    if len(fields) != 4 or fields[3] != settings or fields[0] == "-" or fields[0] != boot_id():
        return None
    try:
        st = os.lstat(os.path.join(cache, name))
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_mtime_ns != SEALED_MTIME_NS \
            or (str(st.st_ino), str(st.st_size)) != (fields[1], fields[2]):
        return None
    return st.st_size, seal  # type: ignore[return-value]


def drop_cached(cache: str, name: str) -> None:
    for suffix in (".ok", ""):
        try:
            os.unlink(os.path.join(cache, name + suffix))
        except OSError:
            pass


# How long a call waits for a segment that the worker is downloading (or is about to: it was
# just asked for the window that holds it and has not started yet), or for a file the
# background pusher is uploading, instead of doing it itself in the full program: a third of
# the default call_timeout, so that the full program still has time (see wait_limit).
WAIT_SECONDS = 10.0
DEFAULT_CALL_TIMEOUT = 30.0  # the call_timeout setting's default (walship.config uses it)


def wait_limit(seconds: float) -> float:
    """``seconds``, cut to ``WALSHIP_CALL_TIMEOUT`` when the environment sets a smaller one:
    a wait of the fast path never outlasts the call's deadline. (Read from the environment
    only, which costs nothing; a ``call_timeout`` in the config file bounds the full program,
    and these waits stay within :data:`WAIT_SECONDS` or :data:`ASK_SECONDS`.)"""
    try:
        limit = float(os.environ.get("WALSHIP_CALL_TIMEOUT") or seconds)
    except ValueError:
        return seconds
    return limit if 0 < limit < seconds else seconds  # (nan compares false: seconds)
GRACE_SECONDS = 0.5
# Defaults of the push_ahead and prefetch settings (walship.config uses these too: the fast
# path reads the settings without the full program).
DEFAULT_PUSH_AHEAD = 8
DEFAULT_PREFETCH = 8


def _in_window(cache: str, name: str) -> bool:
    """Whether ``name`` is one of the segments the worker was last asked to prefetch."""
    text = read_text(os.path.join(cache, "want"))
    fields = text.split() if text else []
    if len(fields) != 2 or not fields[1].isdigit() or len(name) != 24 or len(fields[0]) != 24:
        return False
    want, size = fields[0], int(fields[1])
    if size <= 0 or want[:8] != name[:8]:
        return False
    try:
        depth = _count_setting("prefetch", "WALSHIP_PREFETCH", DEFAULT_PREFETCH)
        per_id = 0x100000000 // size
        ahead = ((int(name[8:16], 16) * per_id + int(name[16:], 16))
                 - (int(want[8:16], 16) * per_id + int(want[16:], 16)))
    except ValueError:
        return False
    return 0 < ahead <= depth


def await_sealed(cache: str, name: str) -> bool:
    """Wait while the prefetch worker is downloading ``name`` (its ``.inflight`` marker, written
    when the download is queued) or, for a moment, while a live worker has ``name`` in its
    window but has not queued it yet. True once it is sealed; False as soon as it is clear it
    will not be (the download ended without a seal, the worker is gone, time is up)."""
    seal = os.path.join(cache, f"{name}.ok")
    if os.path.exists(seal):
        return True
    marker = os.path.join(cache, f"{name}.inflight")
    if not os.path.exists(marker) and (os.path.exists(os.path.join(cache, f"{name}.missing"))
                                       or not _in_window(cache, name)):
        return False  # not being downloaded: the last attempt found nothing, or none is due
    if not worker_alive(cache):
        return False
    import time

    limit = wait_limit(WAIT_SECONDS)
    started = checked = time.monotonic()
    marked = False
    while True:
        if os.path.exists(seal):
            return True
        now = time.monotonic()
        if os.path.exists(marker):
            marked = True
        elif marked or now - started > GRACE_SECONDS:
            return os.path.exists(seal)  # it may have been sealed just before the marker went
        if now - started > limit:
            return False
        if now - checked > 0.05:
            if not worker_alive(cache):
                return os.path.exists(seal)
            checked = now
        time.sleep(0.002)


def deliver_cached(cache: str, name: str, destination: str, settings: str, *,
                   wait: bool = True) -> int | None:
    """Move a cached segment to ``destination`` if it is sealed and intact; return its size.

    With ``wait``, a segment the worker is downloading right now is waited for
    (:func:`await_sealed`). A cached file whose seal no longer holds is deleted, never
    delivered. The worker's notes in the seal (a fall-over: :func:`seal_cached`) are printed on
    stderr, PostgreSQL's log, once the file is delivered.
    """
    if wait and not await_sealed(cache, name):
        return None
    checked = _unbroken(cache, name, settings)
    if checked is None:
        if os.path.exists(os.path.join(cache, f"{name}.ok")):
            drop_cached(cache, name)  # changed since it was verified, or from another boot
        return None
    size, seal = checked
    path = os.path.join(cache, name)
    if os.stat(os.path.dirname(destination) or ".").st_dev != os.stat(path).st_dev:
        # (the cache_dir setting put the cache on another filesystem: no rename across)
        copied = _copy_sealed(path, destination, size)
        drop_cached(cache, name)  # delivered, or changed while it was copied
        if not copied:
            return None
    else:
        os.utime(path)  # delivered with the present as its mtime, like any file just written
        os.replace(path, destination)
        try:
            os.unlink(os.path.join(cache, f"{name}.ok"))
        except OSError:
            pass
    for note in seal_notes(seal):
        print(f"walship: wal-fetch {name}: WARNING (prefetch worker): {note}",
              file=sys.stderr, flush=True)
    return size


def _copy_sealed(path: str, destination: str, size: int) -> bool:
    """Deliver the sealed cache file ``path`` to ``destination`` on another filesystem: copied
    (by the kernel, ``sendfile``) into a temporary file beside ``destination``, which is renamed
    into place only if the cache file still carries its seal's mtime and size after the copy
    (whatever changed it meanwhile moved its mtime): the destination appears complete and
    verified, or not at all. False: it changed. The cache file is left for the caller."""
    directory, base = os.path.split(destination)
    temp = os.path.join(directory, f".{base}.walship-{os.urandom(4).hex()}")
    source = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                copied = 0
                while copied < size:
                    sent = os.sendfile(out, source, copied, min(size - copied, 1 << 30))
                    if sent <= 0:
                        break
                    copied += sent
            finally:
                os.close(out)
            st = os.fstat(source)
            if copied != size or st.st_size != size or st.st_mtime_ns != SEALED_MTIME_NS:
                os.unlink(temp)
                return False
            os.replace(temp, destination)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
    finally:
        os.close(source)
    return True


ASK_SECONDS = 10.0  # how long a call waits for the worker's answer (see wait_limit)


def ask(cache: str, name: str, settings: str) -> str | None:
    """Have the running prefetch worker look ``name`` up in the repository *now*, with its
    warm connection, instead of starting the full program (a cold call costs an interpreter
    and the storage SDK; a lookup by the worker, a few milliseconds).

    Returns ``"found"`` (then ``name`` is sealed in the cache), ``"missing"`` (the repository,
    asked after this call began, says that ``name`` does not exist: an authoritative answer,
    not a cached one), or None: no worker, other settings, an error, no answer in time. With
    None the caller must find out for itself.
    """
    if not worker_alive(cache):
        return None
    directory = os.path.join(cache, "ask")
    request = os.path.join(directory, f"{name}.ask")
    answer = os.path.join(directory, f"{name}.answer")
    nonce = os.urandom(8).hex()
    try:
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        write_atomically(request, f"{nonce} {settings}\n")
    except OSError:
        return None
    wake_worker(cache)
    import time

    limit = wait_limit(ASK_SECONDS)
    started = checked = time.monotonic()
    verdict = None
    try:
        while True:
            text = read_text(answer)
            fields = text.split() if text else []
            if len(fields) == 2 and fields[0] == nonce:
                verdict = fields[1] if fields[1] in ("found", "missing") else None
                return verdict
            now = time.monotonic()
            if now - started > limit:
                return None
            if now - checked > 0.05:
                if not worker_alive(cache):
                    return None
                checked = now
            time.sleep(0.001)
    finally:
        for path in (request, answer):
            try:
                os.unlink(path)
            except OSError:
                pass


def want(cache: str, name: str, segment_size: int) -> None:
    """Tell the prefetch worker which segment PostgreSQL asked for last."""
    write_atomically(os.path.join(cache, "want"), f"{name} {segment_size}\n")
    wake_worker(cache)


WAKE = "wake"  # the worker's FIFO: a byte written to it wakes the worker at once


def wake_worker(cache: str) -> None:
    """Wake the prefetch worker to read ``want`` and ``ask/`` now rather than at its next
    poll; nothing happens when no worker listens (the FIFO has no reader, or is missing)."""
    try:
        fd = os.open(os.path.join(cache, WAKE), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.write(fd, b"!")
    except OSError:
        pass  # full: the worker has bytes to read, so it is awake anyway
    finally:
        os.close(fd)


def seed_want(cache: str, name: str, wal_dir: str) -> None:
    """Before the first call of a recovery starts the worker, tell it where to begin (unless
    a call already did): the segment asked for, or, for a history file (which a recovery asks
    for first), the segment before the one its base backup starts at (``backup_label`` in the
    data directory above ``wal_dir``), so that the window holds the first segments before
    PostgreSQL asks for them. PostgreSQL's default segment size is a guess until a download
    tells the real one (a wrong guess only prefetches names that are never asked for)."""
    if read_text(os.path.join(cache, "want")) is not None:
        return
    if len(name) == 24:
        want(cache, name, DEFAULT_SEGMENT_SIZE)
        return
    label = read_text(os.path.join(os.path.dirname(os.path.abspath(wal_dir)), "backup_label"))
    for line in (label or "").splitlines():
        if line.startswith("START WAL LOCATION:") and "(file " in line:
            start = line.split("(file ", 1)[1].rstrip(")").strip()
            before = _previous_segment(start, DEFAULT_SEGMENT_SIZE)
            if before is not None:
                want(cache, before, DEFAULT_SEGMENT_SIZE)
            return


def _previous_segment(name: str, segment_size: int) -> str | None:
    """The segment before ``name`` on its timeline (None: the first one, or not a name).
    (:mod:`walship.wal` has the full model, but importing it would load ``dataclasses``,
    ``enum`` and ``re`` into the fast path, which calls this.)"""
    if len(name) != 24 or not HEX_DIGITS.issuperset(name):
        return None
    per_id = 0x100000000 // segment_size
    number = int(name[8:16], 16) * per_id + int(name[16:], 16) - 1
    if number < 0:
        return None
    return f"{name[:8]}{number // per_id:08X}{number % per_id:08X}"


def worker_alive(cache: str) -> bool:
    """Whether a prefetch worker holds its lock."""
    return _flock_held(os.path.join(cache, "worker.lock"))


DEFAULT_SEGMENT_SIZE = 16 << 20  # PostgreSQL's default wal_segment_size
START_SECONDS = 2.0  # a worker just started takes its lock within this (it imports little first)


def light_setting(name: str, variable: str) -> str | None:
    """The setting ``name`` from the environment (``variable``) or the config file, read
    without the full program; None if unset. Raises ValueError when it cannot be told (an
    unreadable or invalid file): the caller then leaves the call to the full program."""
    value = os.environ.get(variable)
    if value is not None:
        return value
    path = os.environ.get("WALSHIP_CONFIG") or CONFIG_FILE
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        if os.environ.get("WALSHIP_CONFIG"):
            raise ValueError("the config file named by WALSHIP_CONFIG is missing") from None
        return None
    except OSError as error:
        raise ValueError(str(error)) from None
    import tomllib

    try:
        with handle:
            value = tomllib.load(handle).get(name)
    except (OSError, ValueError) as error:
        raise ValueError(str(error)) from None
    return None if value is None else str(value)


def _count_setting(name: str, variable: str, default: int) -> int:
    """A count setting (push_ahead, prefetch); 0 when it cannot be told."""
    try:
        value = light_setting(name, variable)
    except ValueError:
        return 0
    if value is None:
        return default
    return int(value) if value.strip().isdigit() else 0


def prefetch_enabled() -> bool:
    """Whether the configuration leaves prefetching on (the ``prefetch`` setting, from the
    environment or the config file, is not 0). False when unsure: the full program decides."""
    return _count_setting("prefetch", "WALSHIP_PREFETCH", DEFAULT_PREFETCH) > 0


def backlog_for_pusher(wal_dir: str) -> bool:
    """Whether a background pusher is due: push-ahead is on, the repository is one other
    processes can reach, and more files are ready than one call pushes ahead (the condition
    under which :func:`walship.pushahead.push` starts one)."""
    ahead = _count_setting("push_ahead", "WALSHIP_PUSH_AHEAD", DEFAULT_PUSH_AHEAD)
    try:
        repo = light_setting("repo", "WALSHIP_REPO")
    except ValueError:
        return False
    if ahead <= 0 or not repo or repo.startswith("memory:"):
        return False
    try:
        entries = os.listdir(os.path.join(wal_dir, "archive_status"))
    except OSError:
        return False
    return sum(1 for entry in entries if entry.endswith(".ready")) > ahead + 1


def await_worker(cache: str, seconds: float) -> bool:
    """Wait up to ``seconds`` for a prefetch worker to hold its lock; whether one does."""
    return _await_held(os.path.join(cache, "worker.lock"), seconds)


def await_pusher(wal_dir: str, seconds: float) -> bool:
    """Wait up to ``seconds`` for a background pusher to hold its lock; whether one does."""
    return _await_held(os.path.join(spool_dir(wal_dir), "pusher.lock"), seconds)


def _await_held(lock: str, seconds: float) -> bool:
    import time

    deadline = time.monotonic() + wait_limit(seconds)
    while not _flock_held(lock):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def start_worker(cache: str) -> None:
    """Start the prefetch worker, detached, unless one is running."""
    if worker_alive(cache):
        return
    spawn_detached("walship.prefetch", cache, os.path.join(cache, "worker.log"))
