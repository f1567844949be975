"""Every error walship raises, and the one place that turns an error into an exit status.

Each error carries three short texts: *what* failed, *why*, and a *hint* for the operator. They
are printed on one line, because stderr is PostgreSQL's log. No error text may contain a secret.

Exit statuses are part of the contract with PostgreSQL (see ``RestoreArchivedFile`` in
PostgreSQL's xlogarchive.c): a restore_command that exits with 1 tells PostgreSQL "this file does
not exist", which may end recovery and promote the server. So ``wal-fetch`` exits 1 only for an
authoritative "not found"; every other failure is mapped above 125, which PostgreSQL treats as
fatal and so aborts recovery instead of promoting with WAL missing.
"""

from __future__ import annotations

import enum


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


class Unavailable(WalshipError):
    """Storage could not be reached, or kept failing transiently, within the retry budget."""

    status = ExitStatus.UNAVAILABLE


class RepositoryMissing(Unavailable):
    """The repository itself is absent (unmounted directory, missing container), so a missing
    object proves nothing."""


class StorageError(WalshipError):
    """A permanent storage failure: permission denied, authentication failed, bad request."""

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


def exit_status(error: BaseException, *, recovery: bool = False) -> ExitStatus:
    """Map any exception to an exit status; ``recovery`` is true inside restore_command.

    Unknown exceptions (bugs, ``MemoryError``, ``KeyboardInterrupt``) map to FAILED, never to
    NOT_FOUND: only a :class:`NotFound` may tell PostgreSQL that a file does not exist.
    """
    if isinstance(error, WalshipError):
        status = error.status
    else:
        status = ExitStatus.FAILED
    return status.for_recovery() if recovery else status
