"""``backup-verify``: every part decoded and every file checked against the manifest, writing
nothing; damage and missing WAL found, with their exit statuses. Fake server, file://."""

from __future__ import annotations


import pytest

from tests.backup.test_pipeline import FakeSource, make_cluster, push_wal_names
from walship.archive import Archive
from walship.backup.push import push_backup
from walship.backup.verify import verify_backup
from walship.codec import Codec
from walship.entry import main
from walship.errors import ExitStatus, IntegrityError
from walship.storage import open_storage


@pytest.fixture
def repo(file_repo_env):
    root = file_repo_env
    return root


@pytest.fixture
def backup(repo, tmp_path):
    archive = Archive(open_storage(f"file://{repo}"), Codec())
    data, ts = make_cluster(tmp_path)
    manifest = push_backup(archive, FakeSource(data, ts), part_size=1 << 20).manifest
    push_wal_names(archive, ["000000010000000000000002"])
    return archive, manifest


def test_a_sound_backup_verifies_and_nothing_is_written(backup, tmp_path, capsys):
    archive, manifest = backup
    before = sorted(p for p in tmp_path.rglob("*"))
    result = verify_backup(archive, "LATEST")
    assert result.restorable and result.file_bytes == manifest.size
    assert result.stored_bytes == manifest.stored_size
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert main(["backup-verify", manifest.name]) == 0
    assert f"backup-verify {manifest.name} files ok" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["flip", "swap", "missing"])
def test_a_damaged_part_is_found(backup, repo, capsys, damage):
    archive, manifest = backup
    victim = repo / manifest.parts[1].key
    if damage == "flip":
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        victim.write_bytes(bytes(raw))
    elif damage == "swap":
        victim.write_bytes((repo / manifest.parts[0].key).read_bytes())
    else:
        victim.unlink()
    with pytest.raises(IntegrityError):
        verify_backup(archive, manifest.name)
    assert main(["backup-verify", "LATEST"]) == ExitStatus.INTEGRITY
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ERROR" in err


def test_missing_wal_is_exit_7(backup, repo, capsys):
    archive, manifest = backup
    (repo / "wal" / "000000010000000000000002").unlink()
    assert not verify_backup(archive, "LATEST").restorable
    assert main(["backup-verify", "LATEST"]) == ExitStatus.INCOMPLETE
    assert "lacks WAL it needs" in capsys.readouterr().err


def test_unknown_backup_is_not_found(repo, capsys):
    assert main(["backup-verify", "LATEST"]) == ExitStatus.NOT_FOUND
    assert main(["backup-verify", "nonsense"]) == ExitStatus.USAGE
