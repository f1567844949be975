"""The prefetch worker: keeps the segments after the one PostgreSQL asked for last downloaded,
verified, in the cache beside pg_wal, so that restore_command finds them there.

One worker per cache (it holds ``worker.lock``), started detached by wal-fetch. It reconciles a
window: the ``prefetch`` segments that follow the wanted one on its timeline, capped by
``cache_max_mb``. Whatever lies outside the window (behind replay, another timeline, a stale
download) is deleted; what is missing is downloaded by a bounded thread pool into a temporary
name and sealed (:func:`walship.spool.seal_cached`) only once complete and verified. "Not found" is
never cached: the end of the archive is asked again a moment later. The worker exits, emptying
the cache, once nobody has asked for anything for ``IDLE_SECONDS``.

The cache never takes the space PostgreSQL needs: a window download starts only while the
cache's filesystem keeps :func:`free_space_floor` free with it and every download running
counted as a whole segment; a download that finds the filesystem full pauses them all
(``FULL_PAUSE_SECONDS``). Calls then download straight to pg_wal. A lookup for a call (the
file PostgreSQL waits for) is not held back: it takes the space the call's own download would.

    python -m walship.prefetch CACHE_DIR
"""

from __future__ import annotations

import errno
import os
import re
import select
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from typing import TYPE_CHECKING

from walship import spool, wal
from walship.archive import Transfer
from walship.errors import DiskFull, NotFound

if TYPE_CHECKING:
    from walship.archive import Archive
    from walship.config import Settings

IDLE_SECONDS = 30.0
DEFAULT_SEGMENT_SIZE = spool.DEFAULT_SEGMENT_SIZE
POLL_SECONDS = 0.01  # how often the worker looks for requests where it has no wake FIFO ...
WAKE_SECONDS = 0.1  # ... and how often it steps anyway with one (retries, idleness)
RETRY_SECONDS = 0.5  # after a window download fails, doubling while it keeps failing ...
RETRY_MAX_SECONDS = 8.0  # ... up to this: a standby waiting for WAL polls gently (a call
# that needs the segment asks for it at once, whatever the back-off)
ANSWER_KEEP_SECONDS = 30.0  # a looked-up file waits this long for its caller
NICE = 10  # the worker's CPU priority increment (see main)
STUCK_SECONDS = 300.0  # storage timeouts and retries end a download well before
FULL_PAUSE_SECONDS = 5.0  # no window download for this long after one found no space
DEFAULT_MAX_WAL_SIZE = 1 << 30  # PostgreSQL's default max_wal_size
FLOOR_SEGMENTS = 2  # the floor's margin: a segment a call restores, the new timeline's first
MAX_NOTES = 8  # fall-over notes waiting for a sealed file (a bound: they are once per episode)


def free_space_floor(setting_mb: int | None, segment_size: int, max_wal_size: int | None) -> int:
    """The bytes the cache leaves free on its filesystem: ``cache_min_free_mb`` when set, else
    PostgreSQL's ``max_wal_size`` (its default, 1 GiB, where unknown) and two segments.

    In archive recovery PostgreSQL keeps the segments it restores in pg_wal until a restartpoint
    removes them, about ``max_wal_size`` of WAL apart; once promoted it writes up to about that
    much between checkpoints; the two segments are the one a call restores straight into pg_wal
    and the new timeline's first. What PostgreSQL already holds counts as used, so the floor
    errs on the safe side by that much."""
    if setting_mb is not None:
        return setting_mb << 20
    return (max_wal_size or DEFAULT_MAX_WAL_SIZE) + FLOOR_SEGMENTS * segment_size


_MAX_WAL_SIZE = re.compile(r"\s*max_wal_size\s*=?\s*'?\s*(\d+)\s*(kB|MB|GB|TB)?\s*'?\s*(#.*)?",
                           re.IGNORECASE)
_UNITS = {None: 1 << 20, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}


def read_max_wal_size(data_dir: str | None) -> int | None:
    """``max_wal_size`` in bytes as ``postgresql.conf`` and then ``postgresql.auto.conf`` in the
    data directory set it (the last setting wins, as in PostgreSQL); None where not told there
    (no data directory, the settings elsewhere: an ``include``, ``-c``, a configuration file
    outside the data directory as on Debian). Read once, by the worker."""
    if data_dir is None:
        return None
    found = None
    for conf in ("postgresql.conf", "postgresql.auto.conf"):
        try:
            with open(os.path.join(data_dir, conf), "rb") as handle:
                text = handle.read(1 << 20).decode(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            match = _MAX_WAL_SIZE.fullmatch(line)
            if match:
                found = int(match[1]) * _UNITS[match[2] and match[2].lower()]
    return found


def data_directory(cache: str) -> str | None:
    """The data directory of the cluster the cache serves, where it can be told: above
    ``pg_wal/walship/prefetch``, else the worker's working directory (PostgreSQL runs
    restore_command in the data directory); None unless it holds ``PG_VERSION``."""
    cache = os.path.abspath(cache)
    candidates = [os.getcwd()]
    if os.path.basename(os.path.dirname(cache)) == spool.SPOOL:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(cache))))
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "PG_VERSION")):
            return candidate
    return None


def _say(message: str) -> None:
    """A line in the worker's log; never fails (the log may sit on a full filesystem)."""
    try:
        print(f"walship: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _window(want: tuple[str, int] | None, depth: int, max_bytes: int) -> list[str]:
    if want is None:
        return []
    name, segment_size = want
    try:
        wal.check_segment_size(segment_size)
        if wal.parse_name(name).kind is not wal.FileKind.SEGMENT:
            return []
    except ValueError:
        return []
    depth = max(0, min(depth, max_bytes // segment_size))
    return wal.next_segments(name, depth, segment_size)


def _read_want(cache: str) -> tuple[str, int] | None:
    text = spool.read_text(os.path.join(cache, "want"))
    fields = text.split() if text else []
    if len(fields) != 2 or not fields[1].isdigit():
        return None
    return fields[0], int(fields[1])


class Worker:
    """Reconciles the cache with the window until idle."""

    def __init__(self, cache: str) -> None:
        from walship.archive import open_archive
        from walship.config import load_settings

        self.cache = cache
        self.settings = load_settings()
        self.archive = open_archive(self.settings)
        # Fall-overs to a mirror (once per episode: walship.storage.mirrored.warn_once), told
        # in this worker's log and noted in the seal of the next file it fetches, for the call
        # that delivers it to print in PostgreSQL's log (spool.seal_cached).
        self.notes: list[str] = []
        self.notes_lock = threading.Lock()
        if hasattr(self.archive.storage, "read_seconds"):
            # (with mirrors: each read shares call_timeout out between the repositories, as a
            # wal-fetch call does, so a silent primary does not hold a segment up for long)
            self.archive.storage.read_seconds = self.settings.call_timeout
            from walship.storage import mirrored

            mirrored.on_warning(self.note)
        self.fingerprint = spool.settings_fingerprint()
        self.depth = self.settings.prefetch
        self.max_bytes = self.settings.cache_max_mb << 20
        self.max_wal_size = None if self.settings.cache_min_free_mb is not None \
            else read_max_wal_size(data_directory(cache))
        self.full_until = 0.0  # no window download before (a download found no space)
        self.held_back: int | None = None  # the free space last reported under the floor
        self.pool = ThreadPoolExecutor(max(1, self.settings.parallel),
                                       thread_name_prefix="prefetch")
        self.inflight: dict[str, Future[None]] = {}
        self.retry_at: dict[str, float] = {}
        self.failures: dict[str, int] = {}  # name -> window downloads failed in a row
        self.asks: dict[str, Future[None]] = {}  # lookups asked for by calls (spool.ask)
        self.answered: dict[str, float] = {}  # name -> when: its cache entry is kept a while
        self.served: dict[str, str] = {}  # name -> nonce answered (a dead caller's
        # request stays behind: it is answered once, not again at every step)
        # The worker sleeps until a call writes to the wake FIFO, a download or lookup ends
        # (a byte on a pipe of its own), or its poll interval has passed.
        self.wake_fds, self.poll_seconds = _wake_fifo(cache)
        self._ended_r, self._ended_w = os.pipe()
        os.set_blocking(self._ended_r, False)
        os.set_blocking(self._ended_w, False)
        self.wake_fds.append(self._ended_r)

    def close(self, *, wait: bool = True) -> None:
        """Stop the download pool, waiting for the downloads running, then close the wake FIFO,
        the pipe and the storage's connections. ``wait=False`` only cancels what has not
        started, and closes nothing a running download still uses: the process exits next."""
        self.pool.shutdown(wait=wait, cancel_futures=True)
        if not wait:
            return
        for fd in {*self.wake_fds, self._ended_w}:
            try:
                os.close(fd)
            except OSError:
                pass
        self.wake_fds = []
        self.archive.storage.close()

    def _ended(self, _: object) -> None:
        try:
            os.write(self._ended_w, b"!")
        except OSError:
            pass  # full: the worker will wake anyway

    def sleep(self) -> None:
        """Until something happens, or the poll interval passes."""
        ready, _, _ = select.select(self.wake_fds, [], [], self.poll_seconds)
        for fd in ready:
            try:
                while os.read(fd, 4096):
                    pass
            except BlockingIOError:
                pass

    def note(self, text: str) -> None:
        with self.notes_lock:
            if len(self.notes) < MAX_NOTES:
                self.notes.append(text)

    def take_notes(self) -> list[str]:
        """The notes no sealed file carries yet (those of a fetch that failed included)."""
        if not self.notes:
            return []
        with self.notes_lock:
            notes, self.notes = self.notes, []
        return notes

    def fetch(self, name: str, *, prove_absence: bool = True) -> None:
        """Download ``name`` into the cache, verified, and seal it (with the notes)."""
        self.archive.fetch_wal(name, os.path.join(self.cache, name),
                               prove_absence=prove_absence)
        notes = self.take_notes()
        try:
            spool.seal_cached(self.cache, name, self.fingerprint, notes)
        except BaseException:
            for text in notes:  # (for the next one)
                self.note(text)
            raise

    def download(self, name: str) -> None:
        # The marker was written when the download was queued (see step): a wal-fetch call
        # for this segment waits for it instead of downloading it a second time.
        marker = os.path.join(self.cache, f"{name}.inflight")
        try:
            # (a window segment not found is only not archived yet: no listing to prove the
            # repository holds WAL, which a call's own lookup still does)
            self.fetch(name, prove_absence=False)
        except BaseException:
            spool.drop_cached(self.cache, name)
            raise
        finally:
            os.unlink(marker)

    def lookup(self, name: str, nonce: str, settings: str) -> None:
        """Answer a call's :func:`walship.spool.ask`: fetch ``name`` into the cache now."""
        verdict = "error"
        try:
            if settings != self.fingerprint:
                pass  # asked under other settings: the caller must look for itself
            elif os.path.exists(os.path.join(self.cache, f"{name}.ok")):
                verdict = "found"
            else:
                self.fetch(name)
                verdict = "found"
        except NotFound:
            verdict = "missing"  # the repository says so, asked after the call began
        except BaseException as error:  # noqa: BLE001 - the caller then finds out itself
            spool.drop_cached(self.cache, name)
            _say(f"prefetch lookup {name}: {error}")
        finally:
            self.answered[name] = time.monotonic()
            answer = os.path.join(self.cache, "ask", f"{name}.answer")
            try:
                spool.write_atomically(answer, f"{nonce} {verdict}\n")
            except OSError:  # (a full filesystem): the caller waits for an answer; make room
                spool.drop_cached(self.cache, name)
                try:
                    spool.write_atomically(answer, f"{nonce} error\n")
                except OSError:
                    pass

    def in_use(self) -> set[str]:
        """Segments holding, or about to hold, a file in the cache: cached, being downloaded
        for the window, being looked up for a call."""
        used = set(self.inflight) | {name for name in self.asks if len(name) == 24}
        for entry in os.listdir(self.cache):
            if len(entry) == 24 and entry.isalnum():
                used.add(entry)
        return used

    def make_room(self, window: list[str]) -> None:
        """Before a segment is looked up for a call: if the cache is full, drop the farthest
        downloaded segments of the window (they are downloaded again when there is room), so
        that the segments on disk never outnumber the window."""
        excess = len(self.in_use()) + 1 - len(window)
        for name in reversed(window):
            if excess <= 0:
                return
            if name not in self.inflight and name not in self.asks \
                    and os.path.exists(os.path.join(self.cache, name)):
                spool.drop_cached(self.cache, name)
                excess -= 1

    def serve_asks(self, window: list[str]) -> bool:
        """Start a lookup for every new request; whether any request is waiting."""
        for name, future in list(self.asks.items()):
            if future.done():
                del self.asks[name]
        now = time.monotonic()
        for name, when in list(self.answered.items()):
            if now - when > ANSWER_KEEP_SECONDS:
                del self.answered[name]
        directory = os.path.join(self.cache, "ask")
        try:
            entries = os.listdir(directory)
        except FileNotFoundError:
            return False
        waiting = False
        requested = {entry[:-len(".ask")] for entry in entries if entry.endswith(".ask")}
        self.served = {n: v for n, v in self.served.items() if n in requested}  # bounded
        for name in requested:
            fields = (spool.read_text(os.path.join(directory, f"{name}.ask")) or "").split()
            if len(fields) != 2 or self.served.get(name) == fields[0]:
                continue
            waiting = True
            if name in self.asks or name in self.inflight:
                continue  # answered once the download running for it ends
            self.served[name] = fields[0]
            if len(name) == 24 and not os.path.exists(os.path.join(self.cache, f"{name}.ok")):
                self.make_room(window)
            self.asks[name] = self.pool.submit(self.lookup, name, fields[0], fields[1])
            self.asks[name].add_done_callback(self._ended)
        return waiting or bool(self.asks)

    def step(self, want: tuple[str, int] | None) -> None:
        window = _window(want, self.depth, self.max_bytes)
        keep = set(window)
        # At the end of the archive (the next segment was not found), the segment PostgreSQL
        # asked for last is kept in the cache, downloaded again: recovery reads it once more
        # when it ends (to start the new timeline), and then finds it here.
        last = want[0] if want is not None and window and os.path.exists(
            os.path.join(self.cache, f"{window[0]}.missing")) else None
        if last is not None:
            keep.add(last)
        keep.update(name.split(".", 1)[0] for name in (*self.asks, *self.answered))
        for entry in os.listdir(self.cache):
            if entry in ("want", "worker.lock", "worker.log", "ask", spool.WAKE) \
                    or entry.startswith("want.tmp"):
                continue
            base = entry.lstrip(".").split(".", 1)[0]  # NAME, NAME.ok, .NAME.walship-x, ...
            if base not in keep and base not in self.inflight:
                if entry.endswith(".ok"):  # never delivered: its notes go with the next one
                    for text in spool.seal_notes(spool.read_text(
                            os.path.join(self.cache, entry))):
                        self.note(text)
                try:
                    os.unlink(os.path.join(self.cache, entry))
                except OSError:
                    pass
        for name, future in list(self.inflight.items()):
            if future.done():
                del self.inflight[name]
                error = future.exception()
                if error is None:
                    self.failures.pop(name, None)
                    self.retry_at.pop(name, None)
                else:
                    failures = self.failures[name] = self.failures.get(name, 0) + 1
                    self.retry_at[name] = time.monotonic() + min(
                        RETRY_MAX_SECONDS, RETRY_SECONDS * 2 ** (failures - 1))
                    if isinstance(error, NotFound):  # tells waiting calls not to wait for it
                        try:
                            open(os.path.join(self.cache, f"{name}.missing"), "w").close()
                        except OSError:
                            pass  # (a full filesystem: calls wait for nothing but a moment)
                    else:
                        if _no_space(error):
                            self.full_until = time.monotonic() + FULL_PAUSE_SECONDS
                        _say(f"prefetch {name}: {error}")
        for table in (self.retry_at, self.failures):  # (bounded by the window)
            for name in [name for name in table if name not in keep]:
                del table[name]
        now = time.monotonic()
        # Everything that occupies the cache counts against the window: downloads still running
        # for segments that left it (PostgreSQL moved on faster), and segments looked up for
        # calls (the one a call waits for lies before the window) until their caller takes
        # them. At most len(window) segments are on disk.
        room = len(window) - len(self.in_use())
        if any(not future.done() for future in self.asks.values()):
            room = 0  # a call waits for a lookup: no new download competes with it
        if room > 0 and want is not None:
            room = min(room, self.space_for(want[1], now))
        if last is not None and room > 0 and self._due(last, now):
            self._queue(last)
            room -= 1
        for name in window:
            if room <= 0:
                break
            if name in self.inflight or os.path.exists(os.path.join(self.cache, f"{name}.ok")):
                continue  # (counted in in_use; an unsealed leftover is downloaded over)
            if self.retry_at.get(name, 0) > now:
                break  # not archived yet (or failing): nothing after it is either
            self._queue(name)
            room -= 1

    def space_for(self, segment_size: int, now: float) -> int:
        """How many more segments may be downloaded into the cache while its filesystem keeps
        the floor free, every download or lookup running counted as a whole segment."""
        if now < self.full_until:
            return 0
        try:
            st = os.statvfs(self.cache)
        except OSError:
            return 0
        free = st.f_bavail * st.f_frsize
        running = sum(not future.done() for future in (*self.inflight.values(),
                                                        *self.asks.values()))
        floor = free_space_floor(self.settings.cache_min_free_mb, segment_size,
                                 self.max_wal_size)
        room = max(0, (free - floor) // max(1, segment_size) - running)
        if room == 0 and running == 0 and self.held_back is None:
            self.held_back = free
            _say(f"prefetch: {free >> 20} MiB free on the cache's filesystem, under the floor "
                 f"of {floor >> 20} MiB and a segment: not caching ahead (calls download "
                 "straight to pg_wal)")
        elif room > 0 and self.held_back is not None:
            self.held_back = None
            _say(f"prefetch: {free >> 20} MiB free on the cache's filesystem: caching again")
        return room

    def _due(self, name: str, now: float) -> bool:
        """Whether ``name`` is neither cached, nor being downloaded, nor waiting for a retry."""
        return name not in self.inflight and self.retry_at.get(name, 0) <= now \
            and not os.path.exists(os.path.join(self.cache, f"{name}.ok"))

    def _queue(self, name: str) -> None:
        try:
            open(os.path.join(self.cache, f"{name}.inflight"), "w").close()  # queued
        except OSError as error:  # (a full filesystem): not queued, tried again later
            if _no_space(error):
                self.full_until = time.monotonic() + FULL_PAUSE_SECONDS
            return
        try:
            os.unlink(os.path.join(self.cache, f"{name}.missing"))
        except FileNotFoundError:
            pass
        self.inflight[name] = self.pool.submit(self.download, name)
        self.inflight[name].add_done_callback(self._ended)

    def run(self) -> bool:
        """Until nobody has asked for anything for IDLE_SECONDS; then the cache is emptied and
        nothing new is started. False if downloads still hang STUCK_SECONDS after that (the
        caller then exits without waiting for them)."""
        last_want, last_change = None, time.monotonic()
        while True:
            want = _read_want(self.cache)
            now = time.monotonic()
            # (calls' lookups first: the one a call waits for takes its place before the window
            # is filled)
            asked = self.serve_asks(_window(want, self.depth, self.max_bytes))
            if want != last_want or asked:
                last_want, last_change = want, now
            idle = now - last_change > IDLE_SECONDS
            self.step(None if idle else want)  # idle: empty the cache, start nothing
            if idle and not self.inflight and not self.asks:
                return True
            if now - last_change > IDLE_SECONDS + STUCK_SECONDS:
                return False
            self.sleep()


def _no_space(error: BaseException) -> bool:
    return isinstance(error, DiskFull) or isinstance(error, OSError) \
        and error.errno in (errno.ENOSPC, errno.EDQUOT)


LEFTOVER_SECONDS = 3600.0  # a temporary file this old belongs to no call in progress


def sweep_leftovers(cache: str) -> None:
    """At the start of a worker (it holds the lock: no other worker runs), delete what a worker
    that died left: download markers, unsealed downloads and seals half written (only workers
    write these). Temporary files of calls (``want.tmp<pid>``, ``ask/``) are deleted only once
    older than any call lives, never under a call writing them."""
    now = time.time()

    def old(path: str, seconds: float) -> bool:
        try:
            return now - os.lstat(path).st_mtime > seconds
        except OSError:
            return False

    for entry in os.listdir(cache):
        path = os.path.join(cache, entry)
        if entry.endswith(".inflight") or ".walship-" in entry:
            spool.drop_cached(cache, entry.split(".inflight")[0])
        elif ".tmp" not in entry:
            continue
        elif entry.startswith("want.") and not old(path, LEFTOVER_SECONDS):
            continue  # a call may be writing it right now
        try:
            os.unlink(path)
        except OSError:
            pass
    asks = os.path.join(cache, "ask")
    if spool.own_dir(asks):  # requests and answers of calls killed while they waited
        for entry in os.listdir(asks):
            if old(os.path.join(asks, entry), 2 * spool.ASK_SECONDS):
                try:
                    os.unlink(os.path.join(asks, entry))
                except OSError:
                    pass


def _wake_fifo(cache: str) -> tuple[list[int], float]:
    """Open the cache's wake FIFO (:func:`walship.spool.wake_worker`), made if missing, for
    reading; also for writing, so that it never reads as closed between two callers. Where
    no FIFO can be made, the worker polls instead."""
    path = os.path.join(cache, spool.WAKE)
    try:
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:
            pass
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            return [], POLL_SECONDS
    except OSError:
        return [], POLL_SECONDS
    return [fd], WAKE_SECONDS


def main(cache: str) -> int:
    if not spool.own_dir(cache):  # (its caller checked the way to it: spool.safe_dir)
        print(f"walship: prefetch worker: {cache} is not a private directory of this user "
              "(a symbolic link, another user's, or writable by others): not used",
              file=sys.stderr, flush=True)
        return 2
    lock = os.open(os.path.join(cache, "worker.lock"),
                   os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if not spool.take_lock(lock):
        return 0  # another worker owns this cache
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())
    try:
        # Below PostgreSQL's startup process and the calls it makes, which wait: replay is
        # what recovery waits for, and the window only has to keep ahead of it on average.
        os.nice(NICE)
    except OSError:
        pass
    sweep_leftovers(cache)
    worker = Worker(cache)
    clean = False
    try:
        clean = worker.run()
    finally:
        worker.close(wait=clean)
    if not clean:  # a download hangs past every timeout: never outlive it
        print("walship: prefetch worker: downloads still running after "
              f"{STUCK_SECONDS:.0f} s idle; exiting", file=sys.stderr, flush=True)
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))


def fetch(archive: Archive, settings: Settings, name: str, destination: str,
          deadline: float | None = None) -> Transfer:
    """wal-fetch through the prefetch cache: deliver ``name`` from the cache when the worker has
    it (waiting if it is downloading it right now, until ``deadline`` at most), otherwise
    download it directly; either way move the worker's window to ``name`` and make sure a
    worker runs. The cache's bookkeeping never fails the call: where it cannot be written (a
    full filesystem), the call downloads straight to ``destination``, which fails for lack of
    space only as :class:`~walship.errors.DiskFull`."""
    from walship.archive import archive_name

    if settings.prefetch == 0:
        return archive.fetch_wal(name, destination)
    kind = archive_name(name).kind
    wal_dir = os.path.dirname(destination) or "."
    cache = _open_cache(settings, wal_dir, name)
    if cache is None:
        return archive.fetch_wal(name, destination)
    if kind is not wal.FileKind.SEGMENT:
        # (a history file, asked for before the first segment at the start of recovery: the
        # worker starts now, so that the next calls find it ready to answer them)
        _quietly(spool.seed_want, cache, name, wal_dir)
        _quietly(spool.start_worker, cache)
        return archive.fetch_wal(name, destination)
    started = time.monotonic()
    fingerprint = spool.settings_fingerprint()
    inflight = os.path.join(cache, f"{name}.inflight")
    if deadline is None:
        deadline = started + settings.call_timeout
    while (os.path.exists(inflight) and time.monotonic() < deadline
           and spool.worker_alive(cache)):
        time.sleep(0.005)  # being downloaded: wait rather than download it twice
    # (already waited for above; no grace here: after the fast path found the cached copy
    # corrupt, this call downloads it itself)
    try:
        size = spool.deliver_cached(cache, name, destination, fingerprint, wait=False)
    except OSError:
        size = None  # (no space for a copy from a cache elsewhere: the download says so)
    if size is not None:
        _quietly(spool.want, cache, name, size)
        _quietly(spool.start_worker, cache)
        return Transfer("wal-fetch", name, "delivered from prefetch cache", size, size,
                        time.monotonic() - started)
    previous = _read_want(cache)
    # Start the window now, in parallel with this download, so that the worker (whose start
    # takes a while) is ready for PostgreSQL's next call. With no earlier call to tell the
    # segment size, PostgreSQL's default is assumed until this download tells the real one (a
    # wrong guess only prefetches names that are never asked for: a name is one segment).
    _quietly(spool.want, cache, name, previous[1] if previous is not None
             else DEFAULT_SEGMENT_SIZE)
    _quietly(spool.start_worker, cache)
    result = archive.fetch_wal(name, destination)
    _quietly(spool.want, cache, name, result.bytes_out)
    _quietly(spool.start_worker, cache)
    return result


def _open_cache(settings: Settings, wal_dir: str, name: str) -> str | None:
    """The cache directory for ``wal_dir``, made if missing; None where it may not be used
    (spool's docstring: Safety; said once in the log when a spool exists but is refused) or
    none can be made now (a full filesystem, no ``wal_dir``): the call then downloads straight
    to pg_wal."""
    configured = settings.cache_dir
    if configured and not os.path.isdir(configured):
        from walship.errors import ConfigError

        raise ConfigError(f"the cache_dir {configured} does not exist",
                          hint="create it, writable by the postgres user only, or unset "
                          "cache_dir to keep the cache beside pg_wal")
    try:
        cache = spool.cache_dir(wal_dir, configured)
    except OSError:
        return None
    if spool.safe_dir(configured or wal_dir, cache, create=True):
        return cache
    if configured:
        _say(f"wal-fetch {name}: WARNING: cannot use the cache_dir {configured} (it, and the "
             "cache in it, must be directories of this user that nobody else may write to, "
             "never symbolic links, on a filesystem with room): downloading straight to "
             "pg_wal")
    else:
        notice = spool.refusal(wal_dir)
        if notice:
            _say(f"wal-fetch {name}: {notice}")
    return None


def _quietly(action: Callable[..., object], *args: object) -> None:
    """A step of a call's cache bookkeeping (the window, the worker): a failure (a full
    filesystem) only costs the worker a hint; the call goes on."""
    try:
        action(*args)
    except OSError:
        pass
