"""Progress of a backup transfer: a click progress bar on a terminal, nothing otherwise.

When stderr is not a terminal (cron, systemd, PostgreSQL's log) commands log one summary line
instead, so no bar is ever drawn there.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Protocol


class Progress(Protocol):
    """Receives the total, then the bytes as they are transferred (from several threads)."""

    def start(self, total: int) -> None: ...

    def advance(self, n: int) -> None: ...

    def finish(self) -> None: ...


class NullProgress:
    """Reports nothing."""

    def start(self, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


class TerminalProgress:
    """A click progress bar on stderr, safe to advance from several threads."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._bar: Any = None
        self._lock = threading.Lock()

    def start(self, total: int) -> None:
        import click

        self._bar = click.progressbar(length=max(total, 1), label=self._label,
                                      file=sys.stderr, show_eta=True, show_percent=True,
                                      show_pos=False, width=30)
        self._bar.__enter__()

    def advance(self, n: int) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(n)

    def finish(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.__exit__(None, None, None)
                self._bar = None


def for_stderr(label: str) -> Progress | None:
    """A progress bar when stderr is a terminal, else None."""
    return TerminalProgress(label) if sys.stderr.isatty() else None
