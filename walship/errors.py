"""Every error walship raises, and the one place that turns an error into an exit status.

Each error carries three short texts: *what* failed, *why*, and a *hint* for the operator. They
are printed on one line, because stderr is PostgreSQL's log. No error text may contain a secret.

Exit statuses are part of the contract with PostgreSQL (see ``RestoreArchivedFile`` in
PostgreSQL's xlogarchive.c): a restore_command that exits with 1 tells PostgreSQL "this file does
not exist", which may end recovery and promote the server. So ``wal-fetch`` exits 1 only for an
authoritative "not found"; every other failure is mapped above 125, which PostgreSQL treats as
fatal and so aborts recovery instead of promoting with WAL missing.

One exception: a standby (``standby.signal`` in the data directory) never ends recovery on
"not found", it keeps streaming and asks again later, so there an unreachable or missing
repository (:class:`Unavailable`) is mapped to 1, "not available yet", rather than shutting the
standby down. Integrity failures, wrong keys and bad configuration stay fatal there too.
"""

from __future__ import annotations

import enum
import os


class ExitStatus(enum.IntEnum):
    """Exit statuses of every walship command."""

    OK = 0
    NOT_FOUND = 1  # wal-fetch: the repository says the file does not exist
    USAGE = 2  # bad arguments or configuration
    CONFLICT = 3  # different content is already stored under that name
    UNAVAILABLE = 4  # storage unreachable after bounded retries
    INTEGRITY = 5  # corrupt, truncated or tampered object, wrong key
    FAILED = 6  # any other failure
    INCOMPLETE = 7  # wal-verify / backup-verify: WAL missing (a gap) or history inconsistent
    DRILL_FAILED = 8  # drill: the restore or a validation check failed
    TARGET_MISSED = 9  # drill: restored and validated, but the RTO or RPO target was missed
    TERMINATED = 143  # stopped by SIGTERM (128 + 15, as a shell reports it): fatal to PostgreSQL
    # wal-fetch (restore_command): a failure must abort recovery, so 128 is added.
    RECOVERY_USAGE = 130
    RECOVERY_UNAVAILABLE = 132
    RECOVERY_INTEGRITY = 133
    RECOVERY_FAILED = 134

    def for_recovery(self) -> ExitStatus:
        """The status to use inside restore_command: only OK and NOT_FOUND stay below 126."""
        if self in (ExitStatus.OK, ExitStatus.NOT_FOUND) or self >= 126:
            return self
        try:
            return ExitStatus(self + 128)
        except ValueError:  # a status wal-fetch never produces: still fatal to recovery
            return ExitStatus.RECOVERY_FAILED


class WalshipError(Exception):
    """Base of all walship errors: what failed, why, and what to do about it."""

    status: ExitStatus = ExitStatus.FAILED

    def __init__(self, what: str, why: str = "", hint: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.why = why
        self.hint = hint

    def one_line(self) -> str:
        """The error as one log line: ``what: why (hint: ...)``."""
        text = self.what
        if self.why:
            text += f": {self.why}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return " ".join(text.split())

    def __str__(self) -> str:
        return self.one_line()


class UsageError(WalshipError):
    """Bad arguments or configuration: nothing was attempted."""

    status = ExitStatus.USAGE


class ConfigError(UsageError):
    """The configuration is missing, malformed or contradictory."""


class NotFound(WalshipError):
    """The storage authoritatively says the object does not exist."""

    status = ExitStatus.NOT_FOUND


class AlreadyExists(WalshipError):
    """A create-only put found an object under that key; the stored object is unchanged."""

    status = ExitStatus.CONFLICT


class ContentConflict(WalshipError):
    """Different content is already stored under that name; the stored object is unchanged."""

    status = ExitStatus.CONFLICT


class RepositoryMismatch(ContentConflict):
    """The repository is written with another key (or none, or is not encrypted while a key is
    configured), or holds WAL segments of another size: nothing was stored."""


class Unavailable(WalshipError):
    """Storage could not be reached, or kept failing transiently, within the retry budget."""

    status = ExitStatus.UNAVAILABLE


class RepositoryMissing(Unavailable):
    """The repository itself is absent (unmounted directory, missing container), so a missing
    object proves nothing."""


class StorageError(WalshipError):
    """A permanent storage failure: permission denied, authentication failed, bad request."""

    status = ExitStatus.FAILED


class DiskFull(WalshipError):
    """A local filesystem (pg_wal's, the prefetch cache's) has no space left for a file."""

    status = ExitStatus.FAILED


class IntegrityError(WalshipError):
    """An object failed verification: corrupt, truncated, reordered, swapped or tampered."""

    status = ExitStatus.INTEGRITY


class ArchiveIncomplete(WalshipError):
    """A verification found WAL missing (a gap a restore would stop at) or the timeline
    history files inconsistent; nothing stored is corrupt as far as was checked."""

    status = ExitStatus.INCOMPLETE


class KeyMismatch(IntegrityError):
    """The object was written with another encryption key, or needs a key and none is set."""


class DrillFailed(WalshipError):
    """A restore drill's restore or one of its validation checks failed: the plan is not
    proven."""

    status = ExitStatus.DRILL_FAILED


class TargetMissed(WalshipError):
    """A restore drill restored and validated, but its RTO or RPO exceeded the target."""

    status = ExitStatus.TARGET_MISSED


class Terminated(BaseException):
    """The call was stopped by SIGTERM (PostgreSQL's fast shutdown): raised in the main thread by
    the handler :func:`walship.entry.main` installs. A BaseException, so that no ``except
    Exception`` on the way swallows it, while ``finally`` clauses and ``except BaseException``
    cleanups (temporary files) still run."""

    status = ExitStatus.TERMINATED

    def one_line(self) -> str:
        return "stopped by SIGTERM; temporary files removed"


class DeadlineExceeded(BaseException):
    """The call's deadline (``call_timeout``) passed while it was still running: raised in the
    main thread by the alarm of :mod:`walship.deadline`, a backstop behind the storage layer's
    own deadline. A BaseException for the same reason as :class:`Terminated`."""

    status = ExitStatus.UNAVAILABLE

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds

    def one_line(self) -> str:
        return (f"no result within the call's deadline of {self.seconds:g} s (hint: check the "
                "storage and the network path to it; call_timeout sets the deadline)")


def exit_status(error: BaseException, *, recovery: bool = False,
                standby: bool = False) -> ExitStatus:
    """Map any exception to an exit status; ``recovery`` is true inside restore_command,
    ``standby`` when that restore_command runs in a standby (see :func:`standby_waits`).

    Unknown exceptions (bugs, ``MemoryError``, ``KeyboardInterrupt``) map to FAILED, never to
    NOT_FOUND: only a :class:`NotFound` may tell PostgreSQL that a file does not exist, and
    in a standby, an :class:`Unavailable` repository that it does not exist *yet*.
    """
    if recovery and standby and isinstance(error, (Unavailable, DeadlineExceeded)):
        return ExitStatus.NOT_FOUND
    if isinstance(error, (WalshipError, Terminated, DeadlineExceeded)):
        status = error.status
    else:
        status = ExitStatus.FAILED
    return status.for_recovery() if recovery else status


STANDBY_SIGNAL = "standby.signal"


def standby_waits(error: BaseException) -> bool:
    """Whether a restore_command failing with ``error`` runs in a standby that should wait for
    the repository rather than stop: ``error`` is an unreachable or missing repository and
    ``standby.signal`` is in the working directory, which PostgreSQL makes the data directory
    (one stat, as PostgreSQL's own test, and only for such an error). A standby never ends
    recovery on "not found", so 1 cannot promote it early; archive recovery
    (``recovery.signal``) still aborts."""
    if not isinstance(error, (Unavailable, DeadlineExceeded)):
        return False
    try:
        os.stat(STANDBY_SIGNAL)
    except OSError:
        return False
    return True
