"""Shared by the backup tests."""

from __future__ import annotations

import pytest

from walship.backup import push


@pytest.fixture(autouse=True)
def short_wal_wait(monkeypatch):
    """In-process pushes have no archiver: wait a moment for the WAL, then warn (as after
    --wal-timeout). Pushes run as subprocesses keep the real default."""
    monkeypatch.setattr(push, "WAL_TIMEOUT", 0.1)
