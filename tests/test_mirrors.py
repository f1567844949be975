"""Mirrors (issue 14): several repositories in the config, pushes into every sync one, reads
that fall over, run in-process through the entry point on ``file://`` repositories."""

from __future__ import annotations

import os

import pytest

from walship.config import load_settings
from walship.entry import main
from walship.errors import ConfigError, ExitStatus

SEG = "000000010000000000000001"
SEG2 = "000000010000000000000002"


def segment() -> bytes:
    return os.urandom(1000) + bytes((1 << 20) - 1000)


@pytest.fixture
def repos(tmp_path, monkeypatch):
    """A primary and two mirrors (``west`` sync, ``north`` async), each a directory."""
    roots = {name: tmp_path / name for name in ("primary", "west", "north")}
    for root in roots.values():
        root.mkdir()
    for var in list(os.environ):
        if var.startswith(("WALSHIP_", "AZURE_")):
            monkeypatch.delenv(var)
    config = tmp_path / "walship.toml"
    config.write_text(f'repo = "file://{roots["primary"]}"\n'
                      f'[[mirrors]]\nname = "west"\nrepo = "file://{roots["west"]}"\n'
                      'mode = "sync"\n'
                      f'[[mirrors]]\nname = "north"\nrepo = "file://{roots["north"]}"\n'
                      'mode = "async"\n')
    monkeypatch.setenv("WALSHIP_CONFIG", str(config))
    monkeypatch.setenv("WALSHIP_PREFETCH", "0")  # every call in-process, no worker
    monkeypatch.setenv("WALSHIP_PUSH_AHEAD", "0")
    return roots


@pytest.fixture
def wal_dir(tmp_path):
    directory = tmp_path / "pg_wal"
    directory.mkdir()
    for name in (SEG, SEG2):
        (directory / name).write_bytes(segment())
    return directory


def stored(root, name=SEG):
    return (root / "wal" / name).read_bytes()


def test_push_stores_the_same_bytes_in_primary_and_sync_mirror_only(repos, wal_dir):
    assert main(["wal-push", str(wal_dir / SEG)]) == 0
    assert stored(repos["primary"]) == stored(repos["west"])  # one encoding, stored twice
    assert not (repos["north"] / "wal").exists()  # async: left to repo-sync
    assert main(["wal-push", str(wal_dir / SEG)]) == 0  # identical again: fine everywhere


def test_push_fails_while_a_sync_mirror_is_unreachable_then_completes(repos, wal_dir, tmp_path):
    assert main(["wal-push", str(wal_dir / SEG)]) == 0
    away = tmp_path / "west-away"
    repos["west"].rename(away)
    status = main(["wal-push", str(wal_dir / SEG2)])
    assert status not in (0, 1) and status < 126  # PostgreSQL's archiver retries
    assert (repos["primary"] / "wal" / SEG2).exists()
    away.rename(repos["west"])
    assert main(["wal-push", str(wal_dir / SEG2)]) == 0  # held by the primary: identical
    assert stored(repos["west"], SEG2) == stored(repos["primary"], SEG2)


def test_a_mirror_holding_different_content_refuses_the_push(repos, wal_dir, tmp_path,
                                                             monkeypatch, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / SEG).write_bytes(segment())
    config = os.environ["WALSHIP_CONFIG"]
    (tmp_path / "none.toml").write_text("")
    monkeypatch.setenv("WALSHIP_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("WALSHIP_REPO", f"file://{repos['west']}")
    assert main(["wal-push", str(other / SEG)]) == 0  # another file, in the mirror only
    theirs = stored(repos["west"])
    monkeypatch.setenv("WALSHIP_CONFIG", config)
    monkeypatch.delenv("WALSHIP_REPO")
    capsys.readouterr()
    assert main(["wal-push", str(wal_dir / SEG)]) == ExitStatus.CONFLICT
    assert "DIFFERENT content" in capsys.readouterr().err
    assert stored(repos["west"]) == theirs


def test_fetch_falls_over_to_the_mirror_when_the_primary_is_gone(repos, wal_dir, tmp_path,
                                                                   capsys):
    assert main(["wal-push", str(wal_dir / SEG)]) == 0
    repos["primary"].rename(tmp_path / "lost")
    assert main(["wal-fetch", SEG, str(tmp_path / "out")]) == 0
    assert (tmp_path / "out").read_bytes() == (wal_dir / SEG).read_bytes()
    err = capsys.readouterr().err
    assert "WARNING: repository primary could not answer" in err
    assert "reading from repository west" in err


def test_fetch_reads_a_file_only_a_mirror_holds(repos, wal_dir, tmp_path):
    assert main(["wal-push", str(wal_dir / SEG)]) == 0
    assert main(["wal-push", str(wal_dir / SEG2)]) == 0
    (repos["primary"] / "wal" / SEG2).unlink()
    assert main(["wal-fetch", SEG2, str(tmp_path / "out")]) == 0
    assert (tmp_path / "out").read_bytes() == (wal_dir / SEG2).read_bytes()


def test_not_found_only_when_every_repository_says_so(repos, wal_dir, tmp_path):
    assert main(["wal-push", str(wal_dir / SEG)]) == 0
    assert main(["wal-fetch", SEG2, str(tmp_path / "out")]) == ExitStatus.NOT_FOUND
    # the primary lacks it, a mirror cannot answer: not proven absent, recovery aborts
    repos["north"].rename(tmp_path / "north-away")
    assert main(["wal-fetch", SEG2, str(tmp_path / "out")]) >= 126
    assert not (tmp_path / "out").exists()


def test_a_corrupted_object_is_read_from_the_other_repository(repos, wal_dir, tmp_path, capsys):
    assert main(["wal-push", str(wal_dir / SEG)]) == 0
    damaged = repos["primary"] / "wal" / SEG
    body = bytearray(damaged.read_bytes())
    body[len(body) // 3] ^= 0x01
    damaged.write_bytes(bytes(body))
    assert main(["wal-fetch", SEG, str(tmp_path / "out")]) == 0
    assert (tmp_path / "out").read_bytes() == (wal_dir / SEG).read_bytes()
    assert "read a verified copy from repository west" in capsys.readouterr().err
    # damaged everywhere: the integrity error stands
    (repos["west"] / "wal" / SEG).write_bytes(bytes(body))
    os.unlink(tmp_path / "out")
    assert main(["wal-fetch", SEG, str(tmp_path / "out")]) == ExitStatus.RECOVERY_INTEGRITY
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,message", [
    ('[[mirrors]]\nrepo = "file:///x"\n', "invalid mirror name"),
    ('[[mirrors]]\nname = "primary"\nrepo = "file:///x"\n', "invalid mirror name"),
    ('[[mirrors]]\nname = "a"\nrepo = "file:///x"\n[[mirrors]]\nname = "a"\nrepo = "file:///y"\n',
     "invalid mirror name"),
    ('[[mirrors]]\nname = "a"\n', "has no repo"),
    ('[[mirrors]]\nname = "a"\nrepo = "file:///x"\nmode = "later"\n', "invalid mode"),
    ('[[mirrors]]\nname = "a"\nrepo = "file:///x"\nregion = "eu"\n', "unknown settings: region"),
    ('[[mirrors]]\nname = "a"\nrepo = "file:///x"\n[mirrors.azure]\naccount_kee = "k"\n',
     "unknown settings: azure.account_kee"),
    ('[[mirrors]]\nname = "a"\nrepo = "file:///x"\n[mirrors.azure]\naccount = 3\n',
     "invalid azure.account"),
    ('mirrors = "file:///x"\n', "must be an array of tables"),
])
def test_bad_mirror_settings_are_one_clear_line(tmp_path, text, message):
    path = tmp_path / "walship.toml"
    path.write_text('repo = "file:///p"\n' + text)
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {}, str(path))
    assert message in raised.value.one_line()


def test_mirror_settings_and_their_secrets_masked(tmp_path):
    path = tmp_path / "walship.toml"
    path.write_text('repo = "azure://wal/c1"\n[azure]\naccount = "main"\n'
                    '[[mirrors]]\nname = "westeurope"\nrepo = "azure://wal/c1"\nmode = "sync"\n'
                    '[mirrors.azure]\naccount = "westacct"\naccount_key = "c2VjcmV0"\n')
    path.chmod(0o600)
    settings = load_settings({}, {}, str(path))
    (mirror,) = settings.mirrors
    assert (mirror.name, mirror.mode, mirror.azure.account) == ("westeurope", "sync", "westacct")
    assert settings.mirror_options(mirror).azure.account_key == "c2VjcmV0"
    shown = str(settings.describe())
    assert "c2VjcmV0" not in shown and "westeurope" in shown and "****" in shown
