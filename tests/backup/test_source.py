"""PostgresSource: the servers backup-push accepts (PostgreSQL 12 or newer, as the README says)."""

from __future__ import annotations

import pytest

from walship.backup.source import PostgresSource, version_text
from walship.errors import ExitStatus, UsageError


class _Reached(Exception):
    """The version check let the server through: describe() went on to query it."""


def _source(version: int) -> PostgresSource:
    """A PostgresSource for a server of ``version`` without connecting (describe() only)."""
    source = object.__new__(PostgresSource)
    source._version = version

    def query(*_args: object) -> tuple:
        raise _Reached

    source._one = query  # type: ignore[method-assign]
    return source


@pytest.mark.parametrize("version, shown", [(110022, "11.22"), (100023, "10.23"),
                                            (90624, "9.6.24")])
def test_a_server_older_than_12_is_refused_with_one_clear_line(version, shown):
    with pytest.raises(UsageError) as caught:
        _source(version).describe()
    line = caught.value.one_line()
    assert caught.value.status == ExitStatus.USAGE
    assert f"PostgreSQL {shown} is too old for backup-push" in line
    assert "walship supports PostgreSQL 12 and newer" in line
    assert "\n" not in line


@pytest.mark.parametrize("version", [120000, 150018, 160004, 180000])
def test_12_and_newer_go_on_to_the_backup(version):
    with pytest.raises(_Reached):
        _source(version).describe()


def test_version_text():
    assert version_text(160004) == "16.4"
    assert version_text(180000) == "18.0"
    assert version_text(90624) == "9.6.24"
