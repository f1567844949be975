"""The prefetch worker: keeps the segments after the one PostgreSQL asked for last downloaded,
verified, in the cache beside pg_wal, so that restore_command finds them there.

One worker per cache (it holds ``worker.lock``), started detached by wal-fetch. It reconciles a
window: the ``prefetch`` segments that follow the wanted one on its timeline, capped by
``cache_max_mb``. Whatever lies outside the window (behind replay, another timeline, a stale
download) is deleted; what is missing is downloaded by a bounded thread pool into a temporary
name and sealed (crc32) only once complete and verified against its digest. "Not found" is
never cached: the end of the archive is asked again a moment later. The worker exits, emptying
the cache, once nobody has asked for anything for ``IDLE_SECONDS``.

    python -m walship.prefetch CACHE_DIR
"""

from __future__ import annotations

import fcntl
import os
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
POLL_SECONDS = 0.01
RETRY_SECONDS = 0.5


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

    def download(self, name: str) -> None:
        marker = os.path.join(self.cache, f"{name}.inflight")
        open(marker, "w").close()
        try:
            self.archive.fetch_wal(name, os.path.join(self.cache, name))
            spool.seal_cached(self.cache, name, self.fingerprint)
        except BaseException:
            spool.drop_cached(self.cache, name)
            raise
        finally:
            os.unlink(marker)

    def step(self, want: tuple[str, int] | None) -> None:
        window = _window(want, self.depth, self.max_bytes)
        keep = set(window)
        for entry in os.listdir(self.cache):
            if entry in ("want", "worker.lock", "worker.log") or entry.startswith("want.tmp"):
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
                if error is not None:
                    self.retry_at[name] = time.monotonic() + RETRY_SECONDS
                    if not isinstance(error, NotFound):
                        print(f"walship: prefetch {name}: {error}", file=sys.stderr, flush=True)
        now = time.monotonic()
        for name in window:
            if name in self.inflight or os.path.exists(os.path.join(self.cache, f"{name}.ok")):
                continue
            if self.retry_at.get(name, 0) > now:
                break  # not archived yet (or failing): nothing after it is either
            self.inflight[name] = self.pool.submit(self.download, name)

    def run(self) -> None:
        last_want, last_change = None, time.monotonic()
        while True:
            want = _read_want(self.cache)
            if want != last_want:
                last_want, last_change = want, time.monotonic()
            if time.monotonic() - last_change > IDLE_SECONDS and not self.inflight:
                self.step(None)  # empty the cache
                return
            self.step(want)
            time.sleep(POLL_SECONDS)


def main(cache: str) -> int:
    os.makedirs(cache, exist_ok=True)
    lock = os.open(os.path.join(cache, "worker.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another worker owns this cache
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())
    for entry in os.listdir(cache):  # left by a worker that died: unverified or unsealed
        if entry.endswith(".inflight") or ".walship-" in entry or ".tmp" in entry:
            spool.drop_cached(cache, entry.split(".inflight")[0])
            try:
                os.unlink(os.path.join(cache, entry))
            except OSError:
                pass
    worker = Worker(cache)
    try:
        worker.run()
    finally:
        worker.pool.shutdown(wait=True, cancel_futures=True)
        worker.archive.storage.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))


def fetch(archive: Archive, settings: Settings, name: str, destination: str) -> Transfer:
    """wal-fetch through the prefetch cache: deliver ``name`` from the cache when the worker has
    it (waiting if it is downloading it right now), otherwise download it directly; either way
    move the worker's window to ``name`` and make sure a worker runs."""
    from walship.archive import archive_name

    if settings.prefetch == 0 or archive_name(name).kind is not wal.FileKind.SEGMENT:
        return archive.fetch_wal(name, destination)
    started = time.monotonic()
    cache = spool.cache_dir(os.path.dirname(destination) or ".")
    os.makedirs(cache, exist_ok=True)
    fingerprint = spool.settings_fingerprint()
    inflight = os.path.join(cache, f"{name}.inflight")
    deadline = started + settings.storage_timeout * (settings.storage_retries + 1)
    while (os.path.exists(inflight) and time.monotonic() < deadline
           and spool.worker_alive(cache)):
        time.sleep(0.005)  # being downloaded: wait rather than download it twice
    size = spool.deliver_cached(cache, name, destination, fingerprint)
    if size is not None:
        spool.want(cache, name, size)
        spool.start_worker(cache)
        return Transfer("wal-fetch", name, "delivered from prefetch cache", size, size,
                        time.monotonic() - started)
    previous = _read_want(cache)
    if previous is not None:  # start the window now, in parallel with this download
        spool.want(cache, name, previous[1])
        spool.start_worker(cache)
    result = archive.fetch_wal(name, destination)
    spool.want(cache, name, result.bytes_out)
    spool.start_worker(cache)
    return result
