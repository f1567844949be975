"""The one mapping from errors to exit statuses (walship.errors.exit_status)."""

from __future__ import annotations

import pytest

from walship.errors import (ConfigError, ExitStatus, IntegrityError, KeyMismatch, NotFound,
                            RepositoryMissing, StorageError, Unavailable, UsageError,
                            exit_status, standby_waits)

FATAL_IN_A_STANDBY = [IntegrityError("x"), KeyMismatch("x"), UsageError("x"), ConfigError("x"),
                      StorageError("x"), ZeroDivisionError("x"), KeyboardInterrupt()]


@pytest.mark.parametrize("error", [Unavailable("x"), RepositoryMissing("x")])
def test_unreachable_or_missing_repository(error):
    assert exit_status(error) == ExitStatus.UNAVAILABLE  # e.g. wal-push
    assert exit_status(error, recovery=True) == ExitStatus.RECOVERY_UNAVAILABLE
    assert exit_status(error, recovery=True, standby=True) == ExitStatus.NOT_FOUND
    assert exit_status(error, standby=True) == ExitStatus.UNAVAILABLE  # only restore_command


@pytest.mark.parametrize("error", FATAL_IN_A_STANDBY, ids=lambda e: type(e).__name__)
def test_what_retrying_cannot_mend_stays_fatal_in_a_standby(error):
    status = exit_status(error, recovery=True, standby=True)
    assert status >= 126 and status == exit_status(error, recovery=True)


def test_not_found_is_1_everywhere():
    for standby in (False, True):
        assert exit_status(NotFound("x"), recovery=True, standby=standby) == 1


def test_standby_waits_only_for_the_repository_and_only_in_a_standby(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recovery.signal").touch()
    assert not standby_waits(Unavailable("x"))  # archive recovery: abort, never promote early
    (tmp_path / "standby.signal").touch()
    assert standby_waits(Unavailable("x")) and standby_waits(RepositoryMissing("x"))
    for error in FATAL_IN_A_STANDBY + [NotFound("x")]:
        assert not standby_waits(error)
