"""The time bound of one wal-push or wal-fetch call: ``call_timeout`` seconds from its start.

PostgreSQL waits for every archive_command and restore_command, and a fast shutdown waits for
the archiver's: a call must end, whatever the storage does (a storage that accepts connections
and never answers made a call last minutes, retry after retry). Three things keep the bound:

* the storage layer is given the deadline (:attr:`walship.storage.StorageOptions.deadline`): no
  request, retry, back-off or socket wait goes past it, and what is unfinished fails as
  :class:`~walship.errors.Unavailable` (exit 4, 132 in wal-fetch);
* this process's own waits (for push-ahead uploads, for a download of the prefetch worker) end
  by it, and push-ahead uploads are abandoned as soon as the call's own file has failed;
* a backstop: an alarm (SIGALRM) :data:`GRACE_SECONDS` after the deadline raises
  :class:`~walship.errors.DeadlineExceeded` in the main thread, should anything still block.

While PostgreSQL shuts down, its archiver makes one last round of calls (three tries per file
left, a second apart) and the shutdown waits for it: a wal-push made while the server is
stopping (``postmaster.pid`` in the data directory, the archiver's working directory, says so)
gets at most :data:`STOPPING_SECONDS`, so that a fast shutdown ends within seconds whatever
the storage does; a file not stored then is archived after the restart.

SIGTERM, which PostgreSQL sends on a fast shutdown, is turned into
:class:`~walship.errors.Terminated` by :func:`walship.entry.main`, before anything else runs.
Both exceptions derive from BaseException: ``finally`` clauses and ``except BaseException``
cleanups remove the call's temporary files, and no ``except Exception`` swallows them.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from walship.errors import DeadlineExceeded

GRACE_SECONDS = 2.0  # the storage layer fails by the deadline; the alarm only backs it up
STOPPING_SECONDS = 2.0  # a wal-push's deadline while PostgreSQL shuts down
_PM_STATUS_LINE = 7  # postmaster.pid's 8th line: "starting", "stopping", "ready", "standby"


def server_stopping(data_dir: str = ".") -> bool:
    """Whether the PostgreSQL server of ``data_dir`` is shutting down (its postmaster.pid says
    ``stopping``). False when it cannot tell."""
    try:
        with open(f"{data_dir}/postmaster.pid", encoding="ascii", errors="replace") as handle:
            lines = handle.read(4096).split("\n")
    except OSError:
        return False
    return len(lines) > _PM_STATUS_LINE and lines[_PM_STATUS_LINE].strip() == "stopping"


def left(deadline: float | None) -> float | None:
    """Seconds left before ``deadline`` (never negative), None for no deadline: a timeout for
    :meth:`concurrent.futures.Future.result` and the like."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


@contextmanager
def bounded(started: float, seconds: float) -> Iterator[float]:
    """The deadline of a call that began at ``started`` (a :func:`time.monotonic` instant) and
    may take ``seconds``, with the backstop alarm armed while the block runs (in the main
    thread only: signals are delivered there)."""
    deadline = started + seconds
    if threading.current_thread() is not threading.main_thread():
        yield deadline
        return

    def expired(signum: int, frame: object) -> None:
        raise DeadlineExceeded(seconds)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, max(0.001, deadline + GRACE_SECONDS - time.monotonic()))
    try:
        yield deadline
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
