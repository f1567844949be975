"""Push-ahead: a wal-push call also uploads, in parallel, further segments that PostgreSQL has
marked ``.ready``, and records each durable upload so that PostgreSQL's later calls for them
return at once (see :mod:`walship.fastpath`).

PostgreSQL's ``archive_status`` files are only read, never renamed: PostgreSQL still calls
archive_command for every file and marks it done itself. A record is written only after the
object is durably stored, and is trusted only while the file still matches it. One call at a
time pushes ahead (``push.lock``); a concurrent call just pushes its own file.

When more files are ready than one call pushes ahead (a backlog), the call also starts a
*background pusher* (``python -m walship.pushahead PG_WAL``, detached, one per pg_wal: it holds
``pusher.lock``). Once the call has released ``push.lock`` the pusher takes it and keeps up to
``push_ahead`` files uploaded ahead of PostgreSQL (uploading or recorded, not yet asked for),
``parallel`` at a time, while PostgreSQL's calls consume the records; a call for a file being
uploaded (``pushing/<name>``) waits for its record. The pusher exits once nothing is left to
push for ``IDLE_SECONDS``. It only ever adds records, under the same rules as above, so a call
still succeeds only for a file durably stored. (Only for a repository other processes can
reach: not ``memory://``.)

Push-ahead never makes a call longer than its own file needs: the call's own file is uploaded
first; if it fails, the call fails at once, abandoning the other uploads (they run on daemon
threads, which the process does not wait for: an abandoned upload never becomes visible, the
storage's ``put`` contract); once it succeeds, the others are waited for until the call's
deadline at most (:mod:`walship.deadline`).
"""

from __future__ import annotations

import fcntl
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING

from walship import spool, wal
from walship.archive import Transfer
from walship.deadline import left
from walship.errors import RepositoryMismatch, UsageError

if TYPE_CHECKING:
    from walship.archive import Archive
    from walship.config import Settings


def _ready(status_dir: Path, own: str, limit: int, records: Path, fingerprint: str) -> list[str]:
    """The ``limit`` next files PostgreSQL will ask to archive (history files first, then by
    name, as its archiver does), skipping ``own`` and files already recorded. Only regular
    files of pg_wal whose ``.ready`` is in pg_wal's own ``archive_status`` count: never a
    symbolic link (which could lead anywhere), a FIFO (which would block) or a directory."""
    try:
        if not spool.own_dir(str(status_dir)):
            return []
        entries = os.listdir(status_dir)
    except FileNotFoundError:
        return []
    names = []
    for entry in entries:
        if not entry.endswith(".ready"):
            continue
        name = entry[:-len(".ready")]
        try:
            wal.parse_name(name)
        except ValueError:
            continue
        if name == own or (records / name).exists():
            continue
        try:
            if not stat.S_ISREG(os.lstat(status_dir.parent / name).st_mode):
                continue
        except OSError:
            continue
        names.append(name)
    names.sort(key=lambda n: (not n.endswith(".history"), n))
    return names[:limit]


def _push_one(archive: Archive, path: Path, fingerprint: str) -> bool:
    before = spool.file_fingerprint(str(path))
    archive.push_wal(path)
    if spool.file_fingerprint(str(path)) != before:
        return False
    spool.record_pushed(str(path.parent), path.name, before, fingerprint)
    return True


def _push_and_record(archive: Archive, path: Path, fingerprint: str) -> Transfer:
    before = spool.file_fingerprint(str(path))
    result = archive.push_wal(path)
    if spool.file_fingerprint(str(path)) == before:
        spool.record_pushed(str(path.parent), path.name, before, fingerprint)
    return result


IDLE_SECONDS = 2.0
RETRY_SECONDS = 1.0


def _shared(archive: Archive) -> bool:
    """Whether another process can reach this repository (a background pusher can help)."""
    return not str(getattr(archive.storage, "url", "")).startswith("memory:")


class _Uploads:
    """A few daemon threads running a call's uploads. Unlike ThreadPoolExecutor's, whose threads
    the interpreter joins at exit, they never keep the process alive: a call returns, and
    exits, without waiting for the uploads it abandons."""

    def __init__(self, threads: int) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[object], Callable[[], object]] | None] = \
            queue.SimpleQueue()
        self._threads = threads
        for _ in range(threads):
            threading.Thread(target=self._work, name="push-ahead", daemon=True).start()

    def submit(self, work: Callable[[], object]) -> Future[object]:
        future: Future[object] = Future()
        self._queue.put((future, work))
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, work = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except BaseException as error:  # noqa: BLE001 - handed to whoever waits for it
                future.set_exception(error)

    def abandon(self) -> None:
        """Cancel the uploads not started; the threads end after the ones running."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in range(self._threads):
            self._queue.put(None)


def push(archive: Archive, settings: Settings, path: str | os.PathLike[str],
         deadline: float | None = None) -> Transfer:
    """Push ``path``; alongside, push up to ``settings.push_ahead`` other ready files. If
    ``path`` fails, fail at once (the others are abandoned); else wait for the others until
    ``deadline`` (a :func:`time.monotonic` instant) at most."""
    path = Path(path)
    if settings.push_ahead == 0:
        return archive.push_wal(path)
    wal_dir = path.parent
    root = Path(spool.spool_dir(str(wal_dir)))
    records = root / "pushed"
    if not spool.safe_dir(str(wal_dir), str(records), create=True):
        notice = spool.refusal(str(wal_dir))  # (spool's docstring: Safety)
        if notice:
            print(f"walship: wal-push {path.name}: {notice}", file=sys.stderr, flush=True)
        return archive.push_wal(path)
    try:
        lock = os.open(root / "push.lock",
                       os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return archive.push_wal(path)  # no spool (read-only pg_wal?): plain push
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # the background pusher (or another call) is pushing ahead: if it is uploading
            # this very file, wait for its record rather than upload it twice
            started = time.monotonic()
            if spool.take_pushed(str(path), spool.settings_fingerprint()):
                size = os.stat(path).st_size
                return Transfer("wal-push", path.name, "already pushed ahead", size, size,
                                time.monotonic() - started)
            return archive.push_wal(path)
        fingerprint = spool.settings_fingerprint()
        for stale in os.listdir(records):  # records of files PostgreSQL no longer has
            if not (wal_dir / stale).exists():
                (records / stale).unlink(missing_ok=True)
        ahead = _ready(wal_dir / "archive_status", path.name, settings.push_ahead + 1, records,
                       fingerprint)
        pusher = False
        if len(ahead) > settings.push_ahead:  # a backlog: a background pusher goes on with it
            ahead = ahead[:settings.push_ahead]
            if _shared(archive):
                try:
                    spool.start_pusher(str(wal_dir))  # it waits for push.lock: for this call
                    pusher = True
                except OSError:
                    pass
        pool = _Uploads(max(1, min(settings.parallel, len(ahead) + 1)))
        try:
            # With a pusher about to take over, this call's own file is recorded too, so that
            # the pusher does not upload it again before PostgreSQL marks it done. (Queued
            # first: the call's own file is the first to start.)
            own = pool.submit(lambda: _push_and_record(archive, path, fingerprint) if pusher
                              else archive.push_wal(path))
            others = [(name, pool.submit(lambda n=name: _push_one(archive, wal_dir / n,
                                                                   fingerprint)))
                      for name in ahead]
            # its failure fails the call now: the others are abandoned
            result: Transfer = own.result()  # type: ignore[assignment]
            done = 0
            for name, future in others:
                try:
                    done += bool(future.result(timeout=left(deadline)))
                except FutureTimeout:
                    break  # the deadline: the call's own file is stored, the rest abandoned
                except Exception as error:  # noqa: BLE001 - PostgreSQL will ask again
                    if settings.debug:
                        print(f"walship: push-ahead {name}: {error}", file=sys.stderr)
        finally:
            pool.abandon()
    finally:
        os.close(lock)
    if done:
        result = Transfer(result.action, result.name, f"{result.outcome} (+{done} ahead)",
                          result.bytes_in, result.bytes_out, result.seconds)
    return result


class Pusher:
    """The background pusher: keeps up to ``push_ahead`` ready files uploaded ahead."""

    def __init__(self, wal_dir: Path) -> None:
        from walship.archive import open_archive
        from walship.config import load_settings

        self.wal_dir = wal_dir
        self.settings = load_settings()
        # (the fast path starts a pusher without the full program's wal-push, which refuses a
        # read-only primary first: the pusher refuses it itself)
        self.settings.refuse_read_only_primary("push WAL ahead into")
        self.archive = open_archive(self.settings)
        self.fingerprint = spool.settings_fingerprint()
        self.records = Path(spool.spool_dir(str(wal_dir))) / "pushed"
        self.markers = Path(spool.spool_dir(str(wal_dir))) / "pushing"
        for directory in (self.records, self.markers):
            if not spool.safe_dir(str(wal_dir), str(directory), create=True):
                raise OSError(f"{directory} is not a private directory of this user")
        self.pool = ThreadPoolExecutor(max(1, self.settings.parallel),
                                       thread_name_prefix="push-ahead")
        self.inflight: dict[str, Future[bool]] = {}
        self.retry_at: dict[str, float] = {}
        self.recorded = 0
        self.pushed: set[str] = set()
        self.refused: BaseException | None = None  # the repository refuses this server

    def upload(self, name: str) -> bool:
        try:
            return _push_one(self.archive, self.wal_dir / name, self.fingerprint)
        finally:
            (self.markers / name).unlink(missing_ok=True)

    def step(self) -> bool:
        """Start what is due; whether anything moved (an upload started or ended, a record
        was consumed)."""
        moved = False
        for name, future in list(self.inflight.items()):
            if future.done():
                moved = True
                del self.inflight[name]
                error = future.exception()
                if error is None and future.result():
                    self.pushed.add(name)
                elif isinstance(error, RepositoryMismatch):
                    self.refused = error  # no retry mends it: PostgreSQL's calls say why
                else:
                    self.retry_at[name] = time.monotonic() + RETRY_SECONDS
                    if error is not None:
                        print(f"walship: push-ahead {name}: {error}", file=sys.stderr,
                              flush=True)
        status = self.wal_dir / "archive_status"
        try:  # records PostgreSQL has not asked for yet (its file is still .ready)
            recorded = sum(1 for name in os.listdir(self.records)
                           if (status / f"{name}.ready").exists())
        except FileNotFoundError:
            return False  # pg_wal is gone
        moved = moved or recorded < self.recorded
        self.recorded = recorded
        room = self.settings.push_ahead - recorded - len(self.inflight)
        if room <= 0:
            return moved
        now = time.monotonic()
        for name in _ready(status, "", room + len(self.inflight) + len(self.retry_at)
                           + len(self.pushed), self.records, self.fingerprint):
            if room <= 0:
                break
            if (name in self.inflight or name in self.pushed
                    or self.retry_at.get(name, 0) > now):
                continue  # (pushed: its record may be consumed while the file is still .ready)
            (self.markers / name).touch()
            self.inflight[name] = self.pool.submit(self.upload, name)
            room -= 1
            moved = True
        return moved

    def run(self) -> None:
        """Until nothing has moved for IDLE_SECONDS (no backlog left, or PostgreSQL stopped
        asking)."""
        last = time.monotonic()
        while True:
            if self.refused is not None:
                print(f"walship: background pusher stopped: {self.refused}", file=sys.stderr,
                      flush=True)
                return
            if self.step() or self.inflight:
                last = time.monotonic()
            elif time.monotonic() - last > IDLE_SECONDS:
                return
            time.sleep(0.005)


def main(wal_dir: str) -> int:
    root = spool.spool_dir(wal_dir)
    if not spool.safe_dir(wal_dir, root):  # (its starter checked, this is a second look)
        print(f"walship: background pusher: {root} is not a private directory of this user: "
              "not used", file=sys.stderr, flush=True)
        return 2
    alive = os.open(os.path.join(root, "pusher.lock"),
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if not spool.take_lock(alive):
        return 0  # another pusher serves this pg_wal
    os.ftruncate(alive, 0)
    os.write(alive, f"{os.getpid()}\n".encode())
    try:
        pusher = Pusher(Path(wal_dir))  # imports and connects while the starting call pushes
    except UsageError as error:  # (a read-only primary: the calls fail with the same line)
        print(f"walship: background pusher: {error.one_line()}", file=sys.stderr, flush=True)
        return error.status
    lock = os.open(os.path.join(root, "push.lock"),
                   os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # after the call that started us
    for stale in os.listdir(pusher.markers):  # left by a pusher that died
        (pusher.markers / stale).unlink(missing_ok=True)
    try:
        pusher.run()
    finally:
        pusher.pool.shutdown(wait=True, cancel_futures=True)
        for stale in os.listdir(pusher.markers):
            (pusher.markers / stale).unlink(missing_ok=True)
        pusher.archive.storage.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
