"""The file:// backend beyond the shared contract: ownership when root writes into another
user's repository, and the sweeping of temporary files that killed puts left."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from walship.storage import local, open_storage


@pytest.fixture
def postgres_repository():
    """A repository owned by the postgres user, in a directory that user can reach."""
    if os.geteuid() != 0:
        pytest.skip("not running as root")
    try:
        user = pwd.getpwnam(os.environ.get("WALSHIP_TEST_PGUSER") or "postgres")
    except KeyError:
        pytest.skip("no postgres user")
    place = Path(tempfile.mkdtemp(dir="/tmp", prefix="walship-local-"))
    os.chmod(place, 0o755)
    root = place / "repo"
    root.mkdir(mode=0o750)
    os.chown(root, user.pw_uid, user.pw_gid)
    yield root, user
    shutil.rmtree(place, ignore_errors=True)


def test_what_root_stores_in_another_users_repository_is_that_users(postgres_repository):
    root, user = postgres_repository
    storage = open_storage(f"file://{root}")
    storage.put("wal/000000010000000000000001", [b"segment"])
    storage.put("backups/20261206T000000Z/part-0001", [b"part"])
    made = list(root.rglob("*"))
    assert len(made) == 5  # wal, its object, backups, the backup's directory, its part
    assert all((p.lstat().st_uid, p.lstat().st_gid) == (user.pw_uid, user.pw_gid)
               for p in made), [(str(p), p.lstat().st_uid) for p in made]
    read = subprocess.run(["cat", str(root / "wal" / "000000010000000000000001")],
                          capture_output=True, timeout=30, user=user.pw_uid, group=user.pw_gid,
                          extra_groups=[], check=False)
    assert read.returncode == 0 and read.stdout.startswith(b"segment"), read.stderr
    again = subprocess.run(["touch", str(root / "backups" / "20261206T000000Z" / "x")],
                           capture_output=True, timeout=30, user=user.pw_uid, group=user.pw_gid,
                           extra_groups=[], check=False)
    assert again.returncode == 0, again.stderr  # and writable: its later puts work


def test_root_keeps_its_own_repository(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    open_storage(f"file://{root}").put("wal/000000010000000000000001", [b"segment"])
    assert (root / "wal" / "000000010000000000000001").stat().st_uid == os.geteuid()


def test_leftovers_of_killed_puts_are_swept_by_age(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "SWEEP_ONE_IN", 1, raising=False)  # (1 put in 64; here: all)
    root = tmp_path / "repo"
    (root / "wal").mkdir(parents=True)
    long_ago = time.time() - 2 * 3600
    old = root / "wal" / ".tmp.000000010000000000000001.0123456789ab"
    fresh = root / "wal" / ".tmp.000000010000000000000002.ba9876543210"  # a put in progress
    others = [root / "wal" / ".tmp.notours", root / "wal" / "tmp.x.0123456789ab"]
    for path in (old, fresh, *others):
        path.write_bytes(b"partial")
    for path in (old, *others):
        os.utime(path, (long_ago, long_ago))
    open_storage(f"file://{root}").put("wal/000000010000000000000003", [b"segment"])
    assert not old.exists()
    assert fresh.exists() and all(path.exists() for path in others)
