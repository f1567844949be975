"""One line per operation on stderr, which PostgreSQL writes into its log.

Success: ``walship: wal-push 000000010000000000000003 stored in=16777216 out=901234 seconds=0.041``.
Failure: ``walship: wal-fetch 000000010000000000000003: ERROR: what: why (hint: ...)``; a
traceback follows only in debug mode. A failure that is not fatal (a standby waiting for its
repository) says ``WARNING`` instead, and what follows from it. Lines never contain secrets:
errors are built without them, and an unexpected exception's text is masked
(:func:`walship.redact.redact`).
"""

from __future__ import annotations

import sys
import traceback
from typing import TextIO

from walship.archive import Transfer
from walship.errors import DeadlineExceeded, Terminated, WalshipError


def transfer(result: Transfer, stream: TextIO | None = None) -> None:
    """Log a finished push or fetch."""
    print(f"walship: {result.action} {result.name} {result.outcome} in={result.bytes_in} "
          f"out={result.bytes_out} seconds={result.seconds:.3f}", file=stream or sys.stderr,
          flush=True)


def info(message: str, stream: TextIO | None = None) -> None:
    print(f"walship: {message}", file=stream or sys.stderr, flush=True)


def warning(message: str, stream: TextIO | None = None) -> None:
    """A misconfiguration worth seeing that does not stop the command: nor does a failure to
    print it (a closed or full stderr), which must not change the command's exit status."""
    try:
        print(f"walship: WARNING: {message}", file=stream or sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def not_fatal(action: str, subject: str, exc: BaseException, consequence: str,
              stream: TextIO | None = None) -> None:
    """Log, in one line, a failure that is not fatal and what follows from it."""
    where = f"{action} {subject}".strip()
    text = " ".join(str(exc).split())
    print(f"walship: {where}: WARNING: {text}; {consequence}",
          file=stream or sys.stderr, flush=True)


def error(action: str, subject: str, exc: BaseException, *, debug: bool = False,
          stream: TextIO | None = None) -> None:
    """Log a failure in one line (plus a traceback in debug mode)."""
    stream = stream or sys.stderr
    if isinstance(exc, (WalshipError, Terminated, DeadlineExceeded)):
        text = exc.one_line()
    else:
        from walship.redact import redact  # a library's text may quote a URL with a SAS token

        text = redact(f"internal error: {type(exc).__name__}: {exc}".strip(), limit=1000)
        if not debug:
            text += " (hint: run with --debug or WALSHIP_LOG_LEVEL=debug for a traceback)"
    where = f"{action} {subject}".strip()
    print(f"walship: {where}: ERROR: {text}", file=stream, flush=True)
    if debug:
        traceback.print_exception(exc, file=stream)
