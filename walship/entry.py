"""The ``walship`` console script: runs the CLI and guarantees the exit-status contract.

Only the standard library is imported before the CLI, so that even a broken installation
(a missing dependency, a syntax error) cannot make ``wal-fetch`` exit with 1, PostgreSQL's
"file not found": inside restore_command every failure, however early, exits above 125.

SIGTERM (PostgreSQL's fast shutdown signals the process group of its archiver and startup
process) ends a call at once: the handler installed first thing raises
:class:`walship.errors.Terminated` in the main thread, cleanups remove the call's temporary
files, and the call exits with 143 (128 + 15, as a shell reports death by SIGTERM), which
PostgreSQL treats like the signal itself: fatal, never "file not found". A second SIGTERM
kills at once.
"""

from __future__ import annotations

import _signal  # (built in and loaded at start-up; the signal module would load enum)
import sys
import time

RECOVERY_FAILED = 134  # ExitStatus.RECOVERY_FAILED, repeated so that nothing is imported
FAILED = 6
TERMINATED = 143  # ExitStatus.TERMINATED


def _terminate(signum: int, frame: object) -> None:
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)  # a second SIGTERM kills at once
    from walship.errors import Terminated

    raise Terminated()


def _terminated(error: BaseException) -> bool:
    """Whether ``error`` is :class:`walship.errors.Terminated` (told without importing it)."""
    return type(error).__name__ == "Terminated" and type(error).__module__ == "walship.errors"


GC_THRESHOLD = 10_000  # container allocations between the youngest collections (Python: 700)


def run() -> None:
    """The ``walship`` program: :func:`main`, then the process ends with its status.

    The garbage collector looks for cycles every :data:`GC_THRESHOLD` allocations, not every
    700: a backup makes hundreds of thousands of objects (manifests, WAL rows) and few cycles;
    the collections took 34-46 ms of an incr of the 1.1 GB cluster, 12-15 ms since (measured
    with gc.callbacks). At the end every object left is frozen out of the collector: its
    collections at exit would walk all of them (60-90 ms at the end of an incr, measured), only
    for the process to end."""
    import gc  # (built in)

    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    status = main()
    gc.freeze()
    sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # the call's deadline (call_timeout) counts from here
    argv = sys.argv[1:] if argv is None else argv
    recovery = "wal-fetch" in argv
    try:
        previous = _signal.signal(_signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (an in-process caller): its own handling applies
        return _main(argv, recovery, started)
    try:
        return _main(argv, recovery, started)
    finally:
        _signal.signal(_signal.SIGTERM, previous)


def _main(argv: list[str], recovery: bool, started: float) -> int:
    try:
        if argv == ["--version"]:  # cheap: the tests ask every walship they run its build id
            from walship.build_id import version_line

            print(version_line())
            return 0
        if len(argv) == 2 and argv[0] == "wal-push" or len(argv) == 3 and argv[0] == "wal-fetch":
            from walship import fastpath  # work done ahead: answer without the full program

            if argv[0] == "wal-push" and fastpath.wal_push(argv[1]):
                return 0
            if argv[0] == "wal-fetch":
                status = fastpath.wal_fetch(argv[1], argv[2])
                if status is not None:
                    return status
        from walship.cli import run

        return run(argv, recovery=recovery, started=started)
    except BaseException as error:  # noqa: BLE001 - last line of defence of the contract
        if isinstance(error, SystemExit) and error.code in (0, None) and not recovery:
            return 0
        if _terminated(error):
            print("walship: ERROR: stopped by SIGTERM", file=sys.stderr, flush=True)
            return TERMINATED
        print(f"walship: ERROR: internal error: {type(error).__name__}: {error}",
              file=sys.stderr, flush=True)
        return RECOVERY_FAILED if recovery else FAILED


def installed_launcher(argv0: str | None = None) -> str:
    """Which ``walship`` command is installed beside the running program (``walship check``
    prints it): the native launcher that setup.py builds where a C compiler works, or this
    Python program under that name."""
    import os

    command = os.path.join(os.path.dirname(os.path.abspath(argv0 or sys.argv[0])), "walship")
    try:
        with open(command, "rb") as handle:
            native = handle.read(4) == b"\x7fELF"
    except OSError:
        return "unknown (no walship command beside this program)"
    if native:
        return "native (delivers prefetched segments without starting Python)"
    return "python (no C compiler at install time: install gcc, then walship again)"


if __name__ == "__main__":
    sys.exit(main())
