"""The prefetch worker: keeps the segments after the one PostgreSQL asked for last downloaded,
verified, in the cache beside pg_wal, so that restore_command finds them there.

One worker per cache (it holds ``worker.lock``), started detached by wal-fetch. It reconciles a
window: the ``prefetch`` segments that follow the wanted one on its timeline, capped by
``cache_max_mb``. Whatever lies outside the window (behind replay, another timeline, a stale
download) is deleted; what is missing is downloaded by a bounded thread pool into a temporary
name and sealed (:func:`walship.spool.seal_cached`) only once complete and verified. "Not found" is
never cached: the end of the archive is asked again a moment later. The worker exits, emptying
the cache, once nobody has asked for anything for ``IDLE_SECONDS``.

    python -m walship.prefetch CACHE_DIR
"""

from __future__ import annotations

import os
import select
import stat
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

from typing import TYPE_CHECKING

from walship import spool, wal
from walship.archive import Transfer
from walship.errors import NotFound

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
        self.fingerprint = spool.settings_fingerprint()
        self.depth = self.settings.prefetch
        self.max_bytes = self.settings.cache_max_mb << 20
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

    def fetch(self, name: str, *, prove_absence: bool = True) -> None:
        """Download ``name`` into the cache, verified, and seal it."""
        self.archive.fetch_wal(name, os.path.join(self.cache, name),
                               prove_absence=prove_absence)
        spool.seal_cached(self.cache, name, self.fingerprint)

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
            print(f"walship: prefetch lookup {name}: {error}", file=sys.stderr, flush=True)
        finally:
            self.answered[name] = time.monotonic()
            spool.write_atomically(os.path.join(self.cache, "ask", f"{name}.answer"),
                                   f"{nonce} {verdict}\n")

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
                        open(os.path.join(self.cache, f"{name}.missing"), "w").close()
                    else:
                        print(f"walship: prefetch {name}: {error}", file=sys.stderr, flush=True)
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

    def _due(self, name: str, now: float) -> bool:
        """Whether ``name`` is neither cached, nor being downloaded, nor waiting for a retry."""
        return name not in self.inflight and self.retry_at.get(name, 0) <= now \
            and not os.path.exists(os.path.join(self.cache, f"{name}.ok"))

    def _queue(self, name: str) -> None:
        open(os.path.join(self.cache, f"{name}.inflight"), "w").close()  # queued
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


def _direct(archive: Archive, name: str, destination: str, wal_dir: str) -> Transfer:
    """Without the spool, which may not be used here (spool's docstring: Safety)."""
    notice = spool.refusal(wal_dir)
    if notice:
        print(f"walship: wal-fetch {name}: {notice}", file=sys.stderr, flush=True)
    return archive.fetch_wal(name, destination)


def fetch(archive: Archive, settings: Settings, name: str, destination: str) -> Transfer:
    """wal-fetch through the prefetch cache: deliver ``name`` from the cache when the worker has
    it (waiting if it is downloading it right now), otherwise download it directly; either way
    move the worker's window to ``name`` and make sure a worker runs."""
    from walship.archive import archive_name

    if settings.prefetch == 0:
        return archive.fetch_wal(name, destination)
    if archive_name(name).kind is not wal.FileKind.SEGMENT:
        # (a history file, asked for before the first segment at the start of recovery: the
        # worker starts now, so that the next calls find it ready to answer them)
        wal_dir = os.path.dirname(destination) or "."
        cache = spool.cache_dir(wal_dir)
        if not spool.safe_dir(wal_dir, cache, create=True):
            return _direct(archive, name, destination, wal_dir)
        spool.seed_want(cache, name, wal_dir)
        spool.start_worker(cache)
        return archive.fetch_wal(name, destination)
    started = time.monotonic()
    wal_dir = os.path.dirname(destination) or "."
    cache = spool.cache_dir(wal_dir)
    if not spool.safe_dir(wal_dir, cache, create=True):
        return _direct(archive, name, destination, wal_dir)
    fingerprint = spool.settings_fingerprint()
    inflight = os.path.join(cache, f"{name}.inflight")
    deadline = started + settings.storage_timeout * (settings.storage_retries + 1)
    while (os.path.exists(inflight) and time.monotonic() < deadline
           and spool.worker_alive(cache)):
        time.sleep(0.005)  # being downloaded: wait rather than download it twice
    # (already waited for above; no grace here: after the fast path found the cached copy
    # corrupt, this call downloads it itself)
    size = spool.deliver_cached(cache, name, destination, fingerprint, wait=False)
    if size is not None:
        spool.want(cache, name, size)
        spool.start_worker(cache)
        return Transfer("wal-fetch", name, "delivered from prefetch cache", size, size,
                        time.monotonic() - started)
    previous = _read_want(cache)
    # Start the window now, in parallel with this download, so that the worker (whose start
    # takes a while) is ready for PostgreSQL's next call. With no earlier call to tell the
    # segment size, PostgreSQL's default is assumed until this download tells the real one (a
    # wrong guess only prefetches names that are never asked for: a name is one segment).
    spool.want(cache, name, previous[1] if previous is not None else DEFAULT_SEGMENT_SIZE)
    spool.start_worker(cache)
    result = archive.fetch_wal(name, destination)
    spool.want(cache, name, result.bytes_out)
    spool.start_worker(cache)
    return result
