"""Mirrors (issue 14): several repositories in the config, pushes into every sync one, reads
that fall over, run in-process through the entry point on ``file://`` repositories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from walship.config import load_settings
from walship.entry import main
from walship.errors import ConfigError, ExitStatus, UsageError


def read_only_memory():
    """A memory storage class whose put and delete fail the test (a read member must never be
    written)."""
    from walship.storage.memory import MemoryStorage

    class ReadOnly(MemoryStorage):
        def put(self, key, data, *, metadata=None):
            raise AssertionError(f"put {key} into a read-only member")

        def delete(self, key):
            raise AssertionError(f"delete {key} from a read-only member")

    return ReadOnly

SEG = "000000010000000000000001"
SEG2 = "000000010000000000000002"


def segment() -> bytes:
    return os.urandom(1000) + bytes((1 << 20) - 1000)


def bare_environment(monkeypatch, config: Path | None = None) -> None:
    """No WALSHIP_ or AZURE_ variable of the caller's environment; with ``config``, that file
    written empty and named by WALSHIP_CONFIG."""
    for var in list(os.environ):
        if var.startswith(("WALSHIP_", "AZURE_")):
            monkeypatch.delenv(var)
    if config is not None:
        config.write_text("")
        monkeypatch.setenv("WALSHIP_CONFIG", str(config))


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Each test sees its fall-over warnings (they are printed once per process)."""
    from walship.storage import mirrored

    mirrored._warned.clear()


@pytest.fixture
def repos(tmp_path, monkeypatch):
    """A primary and two mirrors (``west`` sync, ``north`` async), each a directory."""
    roots = {name: tmp_path / name for name in ("primary", "west", "north")}
    for root in roots.values():
        root.mkdir()
    bare_environment(monkeypatch)
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


def test_not_found_needs_the_primary_or_a_sync_mirror_to_say_so(repos, wal_dir, tmp_path,
                                                                 capsys):
    assert main(["wal-push", str(wal_dir / SEG)]) == 0
    out = str(tmp_path / "out")
    assert main(["wal-fetch", SEG2, out]) == ExitStatus.NOT_FOUND  # absent everywhere
    # An async mirror cannot answer: it lags, so the absence stays proven by the others.
    repos["north"].rename(tmp_path / "north-away")
    assert main(["wal-fetch", SEG2, out]) == ExitStatus.NOT_FOUND
    # The primary is lost: the sync mirror holds every acknowledged push, its answer stands.
    repos["primary"].rename(tmp_path / "primary-away")
    capsys.readouterr()
    assert main(["wal-fetch", SEG2, out]) == ExitStatus.NOT_FOUND
    assert "repository primary could not answer" in capsys.readouterr().err
    assert main(["wal-fetch", SEG, out]) == 0  # and it delivers what it holds
    os.unlink(out)
    # Only the async mirror answers: its "not found" proves nothing, recovery aborts.
    (tmp_path / "north-away").rename(repos["north"])
    repos["west"].rename(tmp_path / "west-away")
    assert main(["wal-fetch", SEG2, out]) >= 126
    assert main(["wal-fetch", SEG, out]) >= 126  # (the async mirror never got it)
    assert not os.path.exists(out)


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


# -- repo-sync -------------------------------------------------------------------------------
BACKUP = "20260101T000000Z"
INCOMPLETE = "20260102T000000Z"


def store(root, key, data, codec=None):
    """Store ``data`` under ``key`` in the file:// repository ``root`` through the codec."""
    from walship.codec import Codec
    from walship.storage import open_storage

    storage = open_storage(f"file://{root}")
    stored = (codec or Codec()).stored_form(key, [data], size_hint=len(data))
    storage.put(key, stored, metadata=stored.metadata)


def keys(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.parts))


def add_backups(root):
    for number in (1, 2):
        store(root, f"backups/{BACKUP}/part.{number:05d}", os.urandom(300_000))
    store(root, f"backups/{BACKUP}/manifest", b"{}")
    store(root, f"backups/{INCOMPLETE}/part.00001", os.urandom(1000))  # no manifest yet


def test_repo_sync_copies_wal_and_complete_backups_to_the_async_mirror(repos, wal_dir,
                                                                       capsys):
    import json

    for name in (SEG, SEG2):
        assert main(["wal-push", str(wal_dir / name)]) == 0
    add_backups(repos["primary"])
    capsys.readouterr()
    assert main(["repo-sync", "--to", "north", "--dry-run", "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["keys"] == ["backups/20260101T000000Z/part.00001",
                              "backups/20260101T000000Z/part.00002",
                              "backups/20260101T000000Z/manifest",  # the manifest last
                              f"wal/{SEG}", f"wal/{SEG2}", "walship.json"]
    assert report["lag_seconds"] >= 0 and not (repos["north"] / "wal").exists()
    assert main(["repo-sync", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [(r["to"], r["copied"]) for r in reports] == [("west", 3), ("north", 6)]
    expected = [k for k in keys(repos["primary"]) if INCOMPLETE not in k]
    assert keys(repos["north"]) == expected == keys(repos["west"])
    for key in expected:
        assert (repos["north"] / key).read_bytes() == (repos["primary"] / key).read_bytes()
    assert main(["repo-sync", "--json"]) == 0  # idempotent: nothing left to copy
    assert [r["copied"] for r in json.loads(capsys.readouterr().out)] == [0, 0]
    # the copies are what a restore reads: the async mirror alone serves the WAL
    repos["primary"].rename(repos["primary"].with_name("lost"))
    repos["west"].rename(repos["west"].with_name("lost-west"))
    assert main(["wal-fetch", SEG2, str(wal_dir / "out")]) == 0
    assert (wal_dir / "out").read_bytes() == (wal_dir / SEG2).read_bytes()


def test_repo_sync_never_copies_a_damaged_object(repos, wal_dir, capsys):
    import json

    for name in (SEG, SEG2):
        assert main(["wal-push", str(wal_dir / name)]) == 0
    damaged = repos["primary"] / "wal" / SEG
    body = bytearray(damaged.read_bytes())
    body[len(body) // 3] ^= 0x01
    damaged.write_bytes(bytes(body))
    capsys.readouterr()
    assert main(["repo-sync", "--to", "north", "--json"]) == ExitStatus.INTEGRITY
    (report,) = json.loads(capsys.readouterr().out)
    assert report["damaged"] == [f"wal/{SEG}"] and report["copied"] == 2
    assert keys(repos["north"]) == [f"wal/{SEG2}", "walship.json"]
    # seeded back from the intact mirror, by name
    damaged.unlink()
    assert main(["repo-sync", "--from", "west", "--to", "primary"]) == 0
    assert main(["repo-sync", "--to", "north"]) == 0
    assert stored(repos["north"]) == stored(repos["west"])


def test_repo_sync_usage_errors(repos, tmp_path, monkeypatch, capsys):
    assert main(["repo-sync", "--to", "nowhere"]) == ExitStatus.USAGE
    assert "no repository named 'nowhere'" in capsys.readouterr().err
    (tmp_path / "none.toml").write_text(f'repo = "file://{repos["primary"]}"\n')
    monkeypatch.setenv("WALSHIP_CONFIG", str(tmp_path / "none.toml"))
    assert main(["repo-sync"]) == ExitStatus.USAGE
    assert "repo-sync needs mirrors" in capsys.readouterr().err


def test_repo_sync_killed_at_random_moments_converges(repos, wal_dir, tmp_path):
    """SIGKILL anywhere in a copy: after each kill the mirror shows no incomplete backup as
    complete and no partial object; a final run leaves it identical to the source."""
    import random
    import signal
    import subprocess
    import sys
    import time

    many = tmp_path / "many"
    many.mkdir()
    for number in range(3, 43):
        (many / f"0000000100000000000000{number:02X}").write_bytes(
            os.urandom(1 << 20))
        assert main(["wal-push", str(many / f"0000000100000000000000{number:02X}")]) == 0
    for number in range(1, 9):
        store(repos["primary"], f"backups/{BACKUP}/part.{number:05d}", os.urandom(4 << 20))
    store(repos["primary"], f"backups/{BACKUP}/manifest", b"{}")
    source = keys(repos["primary"])
    command = [sys.executable, "-m", "walship", "repo-sync", "--to", "north"]
    env = {**os.environ, "PYTHONPATH": str(os.path.dirname(os.path.dirname(__file__)))}
    rng = random.Random(14)
    for _ in range(6):
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, 0.35))
        child.send_signal(signal.SIGKILL)
        child.wait()
        held = keys(repos["north"])
        assert set(held) <= set(source)  # nothing partial or foreign is visible
        if f"backups/{BACKUP}/manifest" in held:
            assert all(k in held for k in source if k.startswith(f"backups/{BACKUP}/"))
        for key in held:
            assert (repos["north"] / key).read_bytes() == (repos["primary"] / key).read_bytes()
    assert subprocess.run(command, env=env, timeout=120, check=False).returncode == 0
    assert keys(repos["north"]) == source


def test_status_shows_each_mirrors_lag_until_repo_sync_catches_up(repos, wal_dir, tmp_path,
                                                                 capsys):
    import json

    for name in (SEG, SEG2):
        assert main(["wal-push", str(wal_dir / name)]) == 0
    capsys.readouterr()
    prom = tmp_path / "walship.prom"
    assert main(["status", "--json", "--prometheus", str(prom)]) == 0
    mirrors = {m["name"]: m for m in json.loads(capsys.readouterr().out)["mirrors"]}
    assert (mirrors["west"]["lag_files"], mirrors["west"]["lag_seconds"]) == (0, 0)
    assert mirrors["north"]["lag_files"] == 3 and mirrors["north"]["mode"] == "async"
    assert mirrors["north"]["lag_seconds"] >= 0 and mirrors["north"]["reachable"]
    assert 'walship_mirror_lag_files{mirror="north",mode="async"} 3' in prom.read_text()
    assert main(["repo-sync"]) == 0
    repos["west"].rename(tmp_path / "west-away")
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    mirrors = {m["name"]: m for m in json.loads(capsys.readouterr().out)["mirrors"]}
    assert (mirrors["north"]["lag_files"], mirrors["north"]["lag_seconds"]) == (0, 0)
    assert not mirrors["west"]["reachable"] and "does not exist" in mirrors["west"]["reason"]
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "mirror north   (async) 0 files behind" in out and "west" in out


def test_backups_go_to_every_sync_repository_and_damage_falls_over(repos, tmp_path, capsys):
    from tests.backup.test_pipeline import FakeSource, make_cluster, push_wal_names
    from walship.archive import open_archive
    from walship.backup.push import push_backup

    archive = open_archive(load_settings())
    data, ts = make_cluster(tmp_path)
    push_wal_names(archive, ["000000010000000000000002"])
    manifest = push_backup(archive, FakeSource(data, ts), part_size=1 << 20).manifest
    assert len(manifest.parts) >= 3
    for part in manifest.parts:  # written once, stored twice: the same bytes
        assert (repos["primary"] / part.key).read_bytes() == (repos["west"] / part.key
                                                               ).read_bytes()
    assert (repos["west"] / f"backups/{manifest.name}/manifest").exists()
    assert not (repos["north"] / "backups").exists()
    victim = repos["primary"] / manifest.parts[1].key
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    victim.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["backup-verify", "LATEST"]) == 0
    assert "read a verified copy from repository west" in capsys.readouterr().err
    target = tmp_path / "restored"
    assert main(["backup-fetch", "LATEST", str(target), "--tablespace-map",
                 f"16400={tmp_path / 'new-ts'}"]) == 0
    assert (target / "base/5/16384").read_bytes() == (data / "base/5/16384").read_bytes()
    # damaged in every repository: refused, and nothing startable is left
    (repos["west"] / manifest.parts[1].key).write_bytes(bytes(raw))
    other = tmp_path / "again"
    assert main(["backup-fetch", "LATEST", str(other), "--tablespace-map",
                 f"16400={tmp_path / 'ts2'}"]) == ExitStatus.INTEGRITY
    assert not other.exists() or os.listdir(other) == []


def test_repo_sync_beside_delete_never_leaves_a_manifest_without_its_parts(repos):
    """A delete that removes a backup while repo-sync copies it: the manifest copied last is
    taken back when the parts are gone from the destination."""
    from walship import reposync
    from walship.storage import open_storage

    add_backups(repos["primary"])
    source = open_storage(f"file://{repos['primary']}")
    destination = open_storage(f"file://{repos['north']}")
    work = reposync.plan(source, destination)
    real_put = destination.put

    def put_then_delete(key, data, *, metadata=None):
        info = real_put(key, data, metadata=metadata)
        if key.endswith("/manifest"):  # delete ran between the parts and the manifest
            for part in (1, 2):
                destination.delete(f"backups/{BACKUP}/part.{part:05d}")
        return info

    destination.put = put_then_delete
    result = reposync.sync(source, destination, work=work)
    assert f"backups/{BACKUP}/manifest" in result.vanished
    assert not (repos["north"] / "backups" / BACKUP / "manifest").exists()


def test_delete_applies_retention_to_every_repository_or_one(repos, tmp_path, capsys):
    from tests.backup.test_pipeline import FakeSource, make_cluster
    from walship.archive import Archive, open_archive
    from walship.backup import catalog
    from walship.backup.push import push_backup
    from walship.backup.verify import verify_backup
    from walship.codec import Codec
    from walship.storage import open_storage

    archive = open_archive(load_settings())
    data, ts = make_cluster(tmp_path)
    key = "wal/000000010000000000000002"  # (through the codec: repo-sync verifies it)
    stored = archive.codec.stored_form(key, [b"x"])
    archive.storage.put(key, stored, metadata=stored.metadata)
    old = push_backup(archive, FakeSource(data, ts), part_size=1 << 20).manifest.name
    new = push_backup(archive, FakeSource(data, ts), part_size=1 << 20).manifest.name
    assert main(["repo-sync"]) == 0

    def backups(name):
        alone = Archive(open_storage(f"file://{repos[name]}"), Codec())
        return [b.name for b in catalog.list_backups(alone) if b.manifest], alone

    assert main(["delete", "--retain-full", "1", "--confirm", "--repo", "north"]) == 0
    assert backups("north")[0] == [new] and backups("primary")[0] == [old, new]
    assert main(["delete", "--retain-full", "1", "--repo", "nowhere"]) == ExitStatus.USAGE
    assert main(["delete", "--retain-full", "1", "--confirm"]) == 0
    for name in ("primary", "west", "north"):  # the kept backup, restorable everywhere
        names, alone = backups(name)
        assert names == [new], name
        assert verify_backup(alone, new).restorable
    capsys.readouterr()
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "repository west (sync)" in out and "repository north (async)" in out
    repos["north"].rename(tmp_path / "north-away")
    assert main(["check"]) == ExitStatus.UNAVAILABLE
    assert "repository north (async): UNREACHABLE" in capsys.readouterr().out


def test_verify_and_list_one_repository_alone(repos, wal_dir, capsys):
    import json

    seg3 = "000000010000000000000003"
    (wal_dir / seg3).write_bytes(segment())
    for name in (SEG, SEG2, seg3):
        assert main(["wal-push", str(wal_dir / name)]) == 0
    (repos["west"] / "wal" / SEG2).unlink()  # a gap in one copy only
    assert main(["wal-verify"]) == 0  # all together: nothing is missing
    assert main(["wal-verify", "--repo", "west"]) == ExitStatus.INCOMPLETE
    assert main(["wal-verify", "--repo", "primary"]) == 0
    capsys.readouterr()
    assert main(["backup-list", "--json", "--repo", "north"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["backup-list", "--repo", "elsewhere"]) == ExitStatus.USAGE
    assert main(["backup-verify", "LATEST", "--repo", "west"]) == ExitStatus.NOT_FOUND


def test_a_repository_that_could_not_answer_is_asked_last_for_a_while():
    import uuid

    from walship.errors import NotFound as Missing
    from walship.errors import Unavailable
    from walship.storage.memory import MemoryStorage
    from walship.storage.mirrored import Member, MirroredStorage

    class Down(MemoryStorage):
        calls = 0

        def get(self, key):
            Down.calls += 1
            raise Unavailable("region down")

    url = f"memory://{uuid.uuid4().hex}"
    mirror = MemoryStorage(url)
    mirror.put("wal/a", [b"A"])
    storage = MirroredStorage([Member("primary", Down(f"{url}-p"), "primary"),
                               Member("west", mirror, "sync")])
    try:
        assert storage.get("wal/a").read() == b"A" and Down.calls == 1
        assert storage.get("wal/a").read() == b"A" and Down.calls == 1  # west asked first now
        with pytest.raises(Missing):  # proven absent by the sync mirror, no wait on the primary
            storage.get("wal/b")
        assert Down.calls == 1
        storage._down.clear()  # (its time is up)
        assert storage.get("wal/a").read() == b"A" and Down.calls == 2
    finally:
        MemoryStorage.forget(url)
        MemoryStorage.forget(f"{url}-p")


# -- read-only mirrors (mode = "read": an account's RA-GRS secondary endpoint) -----------------
def tree(root):
    """Every file under ``root`` (dot-files too) with its bytes and mtime: what a write would
    change."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def with_reader(repos, tmp_path, monkeypatch):
    """The ``repos`` set plus ``reader``, a mirror walship may only read (``mode = "read"``),
    kept current behind walship's back (as Azure's geo-replication keeps a secondary)."""
    reader = tmp_path / "reader"
    reader.mkdir()
    config = tmp_path / "walship.toml"
    config.write_text(config.read_text() + f'[[mirrors]]\nname = "reader"\n'
                      f'repo = "file://{reader}"\nmode = "read"\n')
    repos["reader"] = reader
    return repos


def replicate(repos):
    """Copy the primary into the read-only mirror (Azure's replication, in the test)."""
    import shutil

    shutil.copytree(repos["primary"], repos["reader"], dirs_exist_ok=True)


def test_a_read_mirror_is_never_written_by_push_delete_or_repo_sync(with_reader, tmp_path,
                                                                     capsys):
    from tests.backup.test_pipeline import FakeSource, make_cluster
    from walship.archive import open_archive
    from walship.backup.push import push_backup

    repos = with_reader
    archive = open_archive(load_settings())
    data, ts = make_cluster(tmp_path)
    key = "wal/000000010000000000000002"  # (the WAL the backups wait for)
    stored = archive.codec.stored_form(key, [b"x"])
    archive.storage.put(key, stored, metadata=stored.metadata)
    old = push_backup(archive, FakeSource(data, ts), part_size=1 << 20).manifest.name
    push_backup(archive, FakeSource(data, ts), part_size=1 << 20)
    assert tree(repos["reader"]) == {}
    replicate(repos)
    before = tree(repos["reader"])
    assert any(f"{old}/" in key for key in before)
    capsys.readouterr()
    # retention deletes from the others, never from it
    assert main(["delete", "--retain-full", "1", "--confirm"]) == 0
    for name in ("primary", "west"):
        assert not any(f"{old}/" in key for key in tree(repos[name])), name
    assert tree(repos["reader"]) == before
    # naming it is refused, clearly
    assert main(["delete", "--retain-full", "1", "--confirm", "--repo", "reader"]) \
        == ExitStatus.USAGE
    assert "cannot delete from repository reader: it is read-only" in capsys.readouterr().err
    assert main(["repo-sync", "--to", "reader"]) == ExitStatus.USAGE
    assert "cannot repo-sync into repository reader: it is read-only" in \
        capsys.readouterr().err
    # repo-sync's default targets leave it out; it may be a source (to seed another)
    assert main(["repo-sync", "--json"]) == 0
    import json

    out, err = capsys.readouterr()
    assert [r["to"] for r in json.loads(out)] == ["west", "north"]
    assert 'repo-sync primary -> reader: skipped, it is read-only (mode = "read")' in err
    assert main(["repo-sync", "--from", "reader", "--to", "north"]) == 0
    assert main(["repo-sync", "--from", "reader"]) == 0
    assert tree(repos["reader"]) == before


def test_a_read_mirror_serves_reads_but_its_absence_proves_nothing(with_reader, wal_dir,
                                                                   tmp_path, capsys):
    repos = with_reader
    assert main(["wal-push", str(wal_dir / SEG)]) == 0
    assert tree(repos["reader"]) == {}  # not a push target
    replicate(repos)
    before = tree(repos["reader"])
    for name in ("primary", "west", "north"):  # every writable repository is lost
        repos[name].rename(tmp_path / f"{name}-away")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["wal-fetch", SEG, str(out)]) == 0
    assert out.read_bytes() == (wal_dir / SEG).read_bytes()
    assert "reading from repository reader" in capsys.readouterr().err
    # it lags (Azure replicates asynchronously): its "not found" is no proof of absence
    assert main(["wal-fetch", SEG2, str(tmp_path / "out2")]) >= 126
    assert tree(repos["reader"]) == before


def test_mirrored_storage_never_writes_or_deletes_a_read_member():
    import uuid

    from walship.storage.memory import MemoryStorage
    from walship.storage.mirrored import Member, MirroredStorage

    url = f"memory://{uuid.uuid4().hex}"
    reader = read_only_memory()(f"{url}-r")
    MemoryStorage.put(reader, "wal/old", [b"O"])  # (replicated behind walship's back)
    storage = MirroredStorage([Member("primary", MemoryStorage(url), "primary"),
                               Member("reader", reader, "read")])
    try:
        storage.put("wal/a", [b"A"])
        storage.delete("wal/a")
        storage.delete("wal/old")
        assert storage.get("wal/old").read() == b"O"  # still there: read, never deleted
        assert [i.key for i in storage.list("wal/")] == ["wal/old"]
    finally:
        MemoryStorage.forget(url)
        MemoryStorage.forget(f"{url}-r")


SECONDARY_KEY = "RGV2ZWxvcG1lbnRLZXk="  # (a made-up key: never used to sign anything here)


@pytest.mark.parametrize("azure,mode,expected", [
    # an account's secondary endpoint: read-only, and read is its default mode
    ('account = "geo"\naccount_url = "https://geo-secondary.blob.core.windows.net"\n', None,
     "read"),
    ('account = "geo"\naccount_url = "https://geo-secondary.blob.core.windows.net/"\n',
     "read", "read"),
    ((f'connection_string = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;'
      f'AccountKey={SECONDARY_KEY};BlobEndpoint=http://127.0.0.1:10000/'
      f'devstoreaccount1-secondary;"\n'), None, "read"),  # Azurite's path-style form
    # the primary endpoint: async unless told
    ('account = "geo"\naccount_url = "https://geo.blob.core.windows.net"\n', None, "async"),
    ('account = "geo"\n', None, "async"),
    ('account = "geo"\naccount_url = "https://geo.blob.core.windows.net"\n', "read", "read"),
])
def test_a_secondary_endpoint_makes_a_read_mirror(tmp_path, azure, mode, expected):
    path = tmp_path / "walship.toml"
    path.write_text('repo = "azure://wal/c1"\n[azure]\naccount = "main"\n'
                    '[[mirrors]]\nname = "paired"\nrepo = "azure://wal/c1"\n'
                    + (f'mode = "{mode}"\n' if mode else "") + "[mirrors.azure]\n" + azure)
    path.chmod(0o600)
    (mirror,) = load_settings({}, {}, str(path)).mirrors
    assert mirror.mode == expected


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_secondary_endpoint_cannot_be_written_to(tmp_path, mode):
    path = tmp_path / "walship.toml"
    path.write_text('repo = "azure://wal/c1"\n[azure]\naccount = "main"\n'
                    f'[[mirrors]]\nname = "paired"\nrepo = "azure://wal/c1"\nmode = "{mode}"\n'
                    '[mirrors.azure]\naccount = "geo"\n'
                    'account_url = "https://geo-secondary.blob.core.windows.net"\n')
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {}, str(path))
    line = raised.value.one_line()
    assert f"mirror paired in [[mirrors]] number 1 in config file {path} has mode = '{mode}'" \
        in line
    assert "https://geo-secondary.blob.core.windows.net is an account's secondary" in line
    assert 'write mode = "read"' in line


# -- a read-only primary (repo is itself an account's secondary endpoint) ---------------------
def closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def secondary_primary(tmp_path, monkeypatch):
    """``repo`` on an account's secondary endpoint (Azurite's path-style form, on a port where
    nothing listens: any request fails at once, exit 4, never 2) and ``west``, a sync mirror
    (a directory)."""
    bare_environment(monkeypatch)
    west = tmp_path / "west"
    west.mkdir()
    endpoint = f"http://127.0.0.1:{closed_port()}/devstoreaccount1-secondary"
    config = tmp_path / "walship.toml"
    config.write_text(
        'repo = "azure://wal/c1"\n[azure]\nconnection_string = "DefaultEndpointsProtocol=http;'
        f'AccountName=devstoreaccount1;AccountKey={SECONDARY_KEY};BlobEndpoint={endpoint};"\n'
        f'[[mirrors]]\nname = "west"\nrepo = "file://{west}"\nmode = "sync"\n')
    config.chmod(0o600)
    monkeypatch.setenv("WALSHIP_CONFIG", str(config))
    monkeypatch.setenv("WALSHIP_PREFETCH", "0")
    monkeypatch.setenv("WALSHIP_PUSH_AHEAD", "0")
    monkeypatch.setenv("WALSHIP_STORAGE_RETRIES", "0")
    return west, endpoint


def test_a_read_only_primary_is_detected_like_a_read_mirror(tmp_path):
    path = tmp_path / "walship.toml"
    for azure, expected in [
            ('account_url = "https://geo-secondary.blob.core.windows.net"\n',
             "https://geo-secondary.blob.core.windows.net"),
            ('connection_string = "AccountName=devstoreaccount1;AccountKey=' + SECONDARY_KEY
             + ';BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1-secondary"\n',
             "http://127.0.0.1:10000/devstoreaccount1-secondary"),
            ('account_url = "https://geo.blob.core.windows.net"\n', None)]:
        path.write_text('repo = "azure://wal/c1"\n[azure]\naccount = "geo"\n' + azure)
        path.chmod(0o600)
        settings = load_settings({}, {}, str(path))
        assert settings.read_only_primary == expected
        if expected:
            with pytest.raises(UsageError) as raised:
                settings.refuse_read_only_primary("push WAL into")
            assert raised.value.status == ExitStatus.USAGE
            assert raised.value.one_line().startswith(
                f"cannot push WAL into repository primary: its endpoint {expected} is an "
                "account's secondary, read-only")
        else:
            settings.refuse_read_only_primary("push WAL into")
    # (a file:// primary has no secondary endpoint, whatever [azure] says)
    path.write_text(f'repo = "file://{tmp_path}"\n[azure]\naccount = "geo"\n'
                    'account_url = "https://geo-secondary.blob.core.windows.net"\n')
    assert load_settings({}, {}, str(path)).read_only_primary is None


def test_every_command_that_writes_refuses_a_read_only_primary_first(secondary_primary,
                                                                       wal_dir, tmp_path,
                                                                       capsys):
    """wal-push, backup-push, delete and repo-sync --to primary: exit 2 and one line, before
    any request (one would fail with exit 4: nothing listens there) and before the sync mirror
    is written."""
    west, endpoint = secondary_primary
    why = f"its endpoint {endpoint} is an account's secondary, read-only: walship never writes it"
    for argv, action in [
            (["wal-push", str(wal_dir / SEG)], "push WAL into"),
            (["backup-push", "--dbname", "host=/nonexistent"], "back up into"),
            (["delete", "--retain-full", "1", "--confirm"], "delete from"),
            (["delete", "--retain-full", "1"], "delete from"),
            (["delete", "--retain-full", "1", "--repo", "primary"], "delete from"),
            (["repo-sync", "--from", "west", "--to", "primary"], "repo-sync into")]:
        capsys.readouterr()
        assert main(argv) == ExitStatus.USAGE, argv
        err = capsys.readouterr().err
        assert f"cannot {action} repository primary: {why}" in err, (argv, err)
        assert "hint: write through the account's primary endpoint" in err
        assert len(err.strip().splitlines()) == 1, err
    assert list(west.iterdir()) == []
    # its default targets leave it out, as a read mirror's do
    assert main(["repo-sync", "--from", "west"]) == 0
    assert "repo-sync west -> primary: skipped, it is read-only" in capsys.readouterr().err


def test_the_background_pusher_refuses_a_read_only_primary(secondary_primary, tmp_path,
                                                          monkeypatch, capsys):
    """A backlog: the fast path starts the background pusher without the full program (whose
    wal-push refuses first); the pusher refuses by itself, writes nothing, and the call exits 2
    soon after."""
    import time

    from walship import spool

    west, _ = secondary_primary
    monkeypatch.setenv("WALSHIP_PUSH_AHEAD", "3")
    wal_dir = tmp_path / "pg_wal"
    (wal_dir / "archive_status").mkdir(parents=True)
    names = [f"0000000100000000{n:08X}" for n in range(1, 11)]
    for name in names:
        (wal_dir / name).write_bytes(segment())
        (wal_dir / "archive_status" / f"{name}.ready").touch()
    started = time.monotonic()
    assert main(["wal-push", str(wal_dir / names[0])]) == ExitStatus.USAGE
    assert "cannot push WAL into repository primary" in capsys.readouterr().err
    log = wal_dir / "walship" / "pusher.log"
    deadline = time.monotonic() + 30
    while spool.pusher_alive(str(wal_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert time.monotonic() - started < 20
    assert "background pusher: cannot push WAL ahead into repository primary" in \
        log.read_text()
    assert list(west.iterdir()) == []


def test_a_drill_from_a_read_only_primary_skips_storing_its_result(secondary_primary,
                                                                   monkeypatch, capsys):
    from tests.test_drill import _report
    from walship import drill

    def store(*args):
        raise AssertionError("the drill's result was written")

    monkeypatch.setattr(drill, "run_drill", lambda *args, **kwargs: _report())
    monkeypatch.setattr(drill, "store_result", store)
    assert main(["drill"]) == 0
    err = capsys.readouterr().err
    assert "the result was not stored in the repository: repository primary is read-only" \
        in err


@pytest.mark.parametrize("transport", ["auto", "sdk"])
def test_a_read_only_primary_on_azurite_is_read_and_never_written(azure_repository, wal_dir,
                                                                  tmp_path, monkeypatch,
                                                                  capsys, transport):
    """A DR site with only the secondary endpoint configured (Azurite's ``-secondary`` path,
    through a proxy that records every request): wal-fetch delivers what the primary endpoint
    stored, the end of the archive is "not found" (exit 1, as from any single repository),
    check and backup-list read; wal-push, backup-push and delete are refused with no request
    sent. (Azurite accepts writes on a -secondary path, the real service does not: so
    "never written" is checked on the wire.)"""
    from tests.e2e.test_read_mirror import RecordingProxy

    azurite = azure_repository.azurite
    bare_environment(monkeypatch, tmp_path / "none.toml")
    monkeypatch.setenv("WALSHIP_PREFETCH", "0")
    monkeypatch.setenv("WALSHIP_PUSH_AHEAD", "0")
    monkeypatch.setenv("WALSHIP_AZURE_TRANSPORT", transport)
    monkeypatch.setenv("WALSHIP_REPO", azure_repository.url)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    assert main(["wal-push", str(wal_dir / SEG)]) == 0  # (through the primary endpoint)
    proxy = RecordingProxy((azurite.host, azurite.port))
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string.replace(
        f"BlobEndpoint={azurite.blob_endpoint}",
        f"BlobEndpoint={azurite.scheme}://127.0.0.1:{proxy.port}/{azurite.account}-secondary"))
    try:
        out = tmp_path / "out"
        assert main(["wal-fetch", SEG, str(out)]) == 0
        assert out.read_bytes() == (wal_dir / SEG).read_bytes()
        assert main(["wal-fetch", SEG2, str(tmp_path / "out2")]) == ExitStatus.NOT_FOUND
        capsys.readouterr()
        assert main(["check"]) == 0
        assert "repository primary (read)" in capsys.readouterr().out
        assert main(["backup-list", "--json"]) == 0
        reads = len(proxy.requests)
        assert proxy.reads("/wal/") > 0
        for argv in (["wal-push", str(wal_dir / SEG2)], ["backup-push"],
                     ["delete", "--retain-full", "1", "--confirm"]):
            capsys.readouterr()
            assert main(argv) == ExitStatus.USAGE, argv
            assert "repository primary: its endpoint" in capsys.readouterr().err
        assert len(proxy.requests) == reads  # refused before any request
        monkeypatch.setenv("WALSHIP_REPO", azure_repository.url + "-empty")  # no marker there
        capsys.readouterr()
        main(["check"])
        assert ("marker: none yet (a read-only repository: never written here)"
                in capsys.readouterr().out)
        assert proxy.writes() == []
    finally:
        proxy.down()


def test_a_read_only_primary_is_a_member_the_storage_never_writes():
    """Alone, or with a sync mirror: read, never written or deleted; alone, its "not found" is
    the answer (a restore at the secondary's site ends at the end of the archive), and a put
    is refused."""
    import uuid

    from walship.errors import NotFound
    from walship.storage.memory import MemoryStorage
    from walship.storage.mirrored import Member, MirroredStorage

    url = f"memory://{uuid.uuid4().hex}"
    secondary = read_only_memory()(url)
    MemoryStorage.put(secondary, "wal/old", [b"O"])  # (replicated behind walship's back)
    alone = MirroredStorage([Member("primary", secondary, "read")])
    west = MemoryStorage(f"{url}-w")
    paired = MirroredStorage([Member("primary", secondary, "read"),
                              Member("west", west, "sync")])
    try:
        assert alone.url == f"{url} (read-only)"
        assert alone.get("wal/old").read() == b"O"
        with pytest.raises(NotFound) as raised:
            alone.get("wal/new")
        assert not raised.value.what.startswith("repository primary")
        with pytest.raises(UsageError, match="cannot store wal/a: repository primary is "
                                             "read-only"):
            alone.put("wal/a", [b"A"])
        alone.delete("wal/old")
        paired.put("wal/a", [b"A"])  # into the sync mirror only
        assert west.get("wal/a").read() == b"A"
        paired.delete("wal/old")
        assert paired.get("wal/old").read() == b"O"
        with pytest.raises(NotFound):  # (the sync mirror's absence is proof)
            paired.get("wal/new")
    finally:
        MemoryStorage.forget(url)
        MemoryStorage.forget(f"{url}-w")


# -- damaged objects: every reader falls over to the next repository ---------------------------
def flip(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_damaged_manifest_or_part_is_read_from_the_next_repository_by_list_restore_and_drill(
        repos, tmp_path, capsys, monkeypatch):
    import json

    from tests.backup.test_pipeline import FakeSource, make_cluster, push_wal_names
    from walship.archive import open_archive
    from walship.backup.push import push_backup
    from walship.backup.restore import RecoveryTarget
    from walship.drill import run as drill_run
    from walship.drill.report import DrillReport
    from walship.drill.scratch import Scratch

    archive = open_archive(load_settings())
    data, ts = make_cluster(tmp_path)
    push_wal_names(archive, ["000000010000000000000002"])
    manifest = push_backup(archive, FakeSource(data, ts), part_size=1 << 20).manifest
    flip(repos["primary"] / f"backups/{manifest.name}/manifest")
    flip(repos["primary"] / manifest.parts[1].key)
    capsys.readouterr()
    # the listing (and so delete, status, a drill's choice of backup) reads the next copy
    assert main(["backup-list", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [(r["name"], r["complete"]) for r in json.loads(out)] == [(manifest.name, True)]
    assert "read a verified copy from repository west" in err
    assert main(["restore", str(tmp_path / "restored"), "--tablespace-map",
                 f"16400={tmp_path / 'restored-ts'}"]) == 0
    assert (tmp_path / "restored/base/5/16384").read_bytes() == \
        (data / "base/5/16384").read_bytes()

    # the drill's restore: stopped right after it, before any server would start
    class Restored(Exception):
        pass

    def stop(*args):
        raise Restored

    monkeypatch.setattr(drill_run, "controldata", stop)
    scratch = Scratch(tmp_path / "scratch", True)
    scratch.root.mkdir()
    server = type("Server", (), {"runner": type("Runner", (), {"own": lambda self, p: None})(),
                                 "bindir": "/nowhere"})()
    report = DrillReport(datetime_now(), drill_run.DrillPlan(), "latest", manifest.name,
                         str(scratch.root), 5432, "/nowhere")
    settings = load_settings()
    archive = open_archive(settings)  # (a new process would: nothing remembered)
    with pytest.raises(Restored):
        drill_run._restore_and_check(archive, settings, manifest, RecoveryTarget(), scratch,
                                     server, report, 0.0, lambda: 0.0, lambda _: None)
    assert (scratch.data / "base/5/16384").read_bytes() == (data / "base/5/16384").read_bytes()
    assert (scratch.data / "recovery.signal").exists()


def datetime_now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


# -- a silent primary: the call's time is shared out between the repositories ----------------
@pytest.fixture
def silent_endpoint():
    """A port that accepts connections and never answers (a hung storage front end)."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []

    def accept():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()
    for conn in held:
        conn.close()


AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")  # (Azurite's public development key: no secret)
CALL_TIMEOUT = 8


@pytest.mark.parametrize("transport,mirror", [("auto", "file"), ("auto", "azure"),
                                               ("sdk", "azure")])
def test_a_silent_primary_leaves_the_mirror_time_to_deliver(silent_endpoint, tmp_path,
                                                            monkeypatch, wal_dir, transport,
                                                            mirror, request):
    """A primary endpoint that accepts connections and never answers, and a sync mirror
    (a directory, or Azurite, whose requests keep to the call's deadline too): wal-fetch
    delivers from the mirror within call_timeout, the primary having had its share."""
    import time

    bare_environment(monkeypatch, tmp_path / "none.toml")
    monkeypatch.setenv("WALSHIP_PUSH_AHEAD", "0")
    if mirror == "file":
        west = tmp_path / "west"
        west.mkdir()
        url, table = f"file://{west}", ""
    else:
        repo = request.getfixturevalue("azure_repository")
        connection = repo.azurite.connection_string
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection)
        url, table = repo.url, f'[mirrors.azure]\nconnection_string = "{connection}"\n'
    monkeypatch.setenv("WALSHIP_REPO", url)
    assert main(["wal-push", str(wal_dir / SEG)]) == 0  # (what the sync mirror holds)
    monkeypatch.delenv("WALSHIP_REPO")
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    config = tmp_path / "walship.toml"
    config.write_text(
        'repo = "azure://wal/cluster1"\n[azure]\nconnection_string = "DefaultEndpointsProtocol='
        f'http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};BlobEndpoint=http://'
        f'127.0.0.1:{silent_endpoint}/devstoreaccount1;"\n'
        f'[[mirrors]]\nname = "west"\nrepo = "{url}"\nmode = "sync"\n' + table)
    config.chmod(0o600)
    monkeypatch.setenv("WALSHIP_CONFIG", str(config))
    monkeypatch.setenv("WALSHIP_PREFETCH", "0")
    monkeypatch.setenv("WALSHIP_AZURE_TRANSPORT", transport)
    # a request may wait 30 s and be retried: alone, the silent primary would take the call
    monkeypatch.setenv("WALSHIP_STORAGE_TIMEOUT", "30")
    monkeypatch.setenv("WALSHIP_STORAGE_RETRIES", "4")
    monkeypatch.setenv("WALSHIP_CALL_TIMEOUT", str(CALL_TIMEOUT))
    out = tmp_path / "out"
    started = time.monotonic()
    assert main(["wal-fetch", SEG, str(out)]) == 0
    took = time.monotonic() - started
    print(f"wal-fetch with a silent primary took {took:.2f} s (call_timeout {CALL_TIMEOUT})")
    assert out.read_bytes() == (wal_dir / SEG).read_bytes()
    # the primary had half the call (its share), the mirror delivered within the rest
    assert CALL_TIMEOUT * 0.5 - 0.5 <= took < CALL_TIMEOUT - 1, took


def test_a_fall_over_is_told_again_after_the_repository_answered_again(capsys):
    """Once per episode: a repository that could not answer is told once, however many reads
    fall over; once it has answered again, its next fall-over is told again (the prefetch
    worker lives through several)."""
    import uuid

    from walship.errors import Unavailable
    from walship.storage.memory import MemoryStorage
    from walship.storage.mirrored import Member, MirroredStorage

    class Flaky(MemoryStorage):
        down = True

        def get(self, key):
            if self.down:
                raise Unavailable("no answer")
            return super().get(key)

    url = f"memory://{uuid.uuid4().hex}"
    primary, west = Flaky(url), MemoryStorage(f"{url}-w")
    for storage in (primary, west):
        MemoryStorage.put(storage, "wal/a", [b"A"])
    storage = MirroredStorage([Member("primary", primary, "primary"),
                               Member("west", west, "sync")])
    told = []
    try:
        for episode in range(2):
            primary.down = True
            for _ in range(3):
                storage._down.clear()  # (asked first again, as after DOWN_SECONDS)
                assert storage.get("wal/a").read() == b"A"
            told.append(capsys.readouterr().err.count("repository primary could not answer"))
            primary.down = False
            storage._down["primary"] = 0.0  # (it could not answer lately)
            assert storage.get("wal/a").read() == b"A"
        assert told == [1, 1]
    finally:
        MemoryStorage.forget(url)
        MemoryStorage.forget(f"{url}-w")


def test_a_body_that_fails_mid_way_goes_on_from_the_next_repository(capsys):
    """The primary answers, then its body fails after some bytes: the read goes on from the
    next member holding the same stored bytes (same size and object digest), from the byte
    reached; a member holding other bytes is passed over; with none left, the error stands."""
    import uuid

    from walship.errors import Unavailable
    from walship.storage.base import BytesDownload
    from walship.storage.memory import MemoryStorage
    from walship.storage.mirrored import Member, MirroredStorage

    body = os.urandom(300_000)
    same = {"walship_sha256": "d" * 64}

    class Cut(BytesDownload):
        def read(self, n=-1):
            if self._pos >= 100_000:
                raise Unavailable("cannot read wal/a", "timed out")
            return super().read(min(n, 40_000))

    class Failing(MemoryStorage):
        def get(self, key):
            return Cut(MemoryStorage.get(self, key).info, body)

    url = f"memory://{uuid.uuid4().hex}"
    primary, other, west = Failing(url), MemoryStorage(f"{url}-o"), MemoryStorage(f"{url}-w")
    MemoryStorage.put(primary, "wal/a", [body], metadata=lambda: same)
    other.put("wal/a", [os.urandom(300_000)], metadata=lambda: {"walship_sha256": "e" * 64})
    west.put("wal/a", [body], metadata=lambda: same)
    try:
        storage = MirroredStorage([Member("primary", primary, "primary"),
                                   Member("other", other, "async"),
                                   Member("west", west, "sync")])
        with storage.get("wal/a") as download:
            got = b"".join(iter(lambda: download.read(1 << 16), b""))
        assert got == body
        err = capsys.readouterr().err
        assert ("repository primary could not answer (cannot read wal/a: timed out) after "
                "120000 of 300000 bytes of wal/a: reading the rest from repository west") in err
        alone = MirroredStorage([Member("primary", primary, "primary"),
                                 Member("other", other, "async")])
        with pytest.raises(Unavailable, match="timed out"), alone.get("wal/a") as download:
            while download.read(1 << 16):
                pass
    finally:
        for name in (url, f"{url}-o", f"{url}-w"):
            MemoryStorage.forget(name)


@pytest.fixture
def stalling_proxy():
    """A TCP proxy to a given target that, once ``stall_after`` is set, passes on only that
    many bytes of each reply and then nothing (the connection stays open): headers and part
    of a body, then a stall."""
    import threading

    from tests.e2e.test_standby_outage import Proxy

    class Stalling(Proxy):
        stall_after: int | None = None

        def _reply(self, server, client):
            passed = 0
            try:
                while data := server.recv(65536):
                    if self.stall_after is not None:
                        data = data[:max(0, self.stall_after - passed)]
                        if not data:
                            threading.Event().wait()  # (a stall: until the test ends)
                    client.sendall(data)
                    passed += len(data)
            except OSError:
                pass

    made = []

    def make(target):
        made.append(Stalling(target))
        return made[-1]

    yield make
    for proxy in made:
        proxy.down()


@pytest.mark.parametrize("transport", ["auto", "sdk"])
def test_a_primary_whose_body_stalls_leaves_the_mirror_time_to_deliver(
        azure_repository, stalling_proxy, tmp_path, monkeypatch, transport):
    """The primary (Azurite behind a proxy) sends the reply's headers and 64 KiB of a 1 MiB
    body, then nothing: wal-fetch goes on from the sync mirror within call_timeout, the
    primary having had half of it."""
    import time

    azurite = azure_repository.azurite
    proxy = stalling_proxy((azurite.host, azurite.port))
    bare_environment(monkeypatch)
    west = tmp_path / "west"
    west.mkdir()
    connection = azurite.connection_string.replace(
        f"BlobEndpoint={azurite.blob_endpoint}",
        f"BlobEndpoint={azurite.scheme}://127.0.0.1:{proxy.port}/{azurite.account}")
    config = tmp_path / "walship.toml"
    config.write_text(f'repo = "{azure_repository.url}"\n[azure]\nconnection_string = '
                      f'"{connection}"\n[[mirrors]]\nname = "west"\nrepo = "file://{west}"\n'
                      'mode = "sync"\n')
    config.chmod(0o600)
    monkeypatch.setenv("WALSHIP_CONFIG", str(config))
    monkeypatch.setenv("WALSHIP_PREFETCH", "0")
    monkeypatch.setenv("WALSHIP_PUSH_AHEAD", "0")
    monkeypatch.setenv("WALSHIP_AZURE_TRANSPORT", transport)
    monkeypatch.setenv("WALSHIP_STORAGE_TIMEOUT", "30")
    monkeypatch.setenv("WALSHIP_STORAGE_RETRIES", "4")
    monkeypatch.setenv("WALSHIP_CALL_TIMEOUT", str(CALL_TIMEOUT))
    source = tmp_path / "source"
    source.mkdir()
    (source / SEG).write_bytes(os.urandom(1 << 20))  # (stored: 1 MiB, incompressible)
    assert main(["wal-push", str(source / SEG)]) == 0  # into both, the same stored bytes
    proxy.stall_after = 64 << 10
    out = tmp_path / "out"
    started = time.monotonic()
    assert main(["wal-fetch", SEG, str(out)]) == 0
    took = time.monotonic() - started
    print(f"wal-fetch with a primary whose body stalls took {took:.2f} s "
          f"(call_timeout {CALL_TIMEOUT}, {transport})")
    assert out.read_bytes() == (source / SEG).read_bytes()
    assert CALL_TIMEOUT * 0.5 - 0.5 <= took < CALL_TIMEOUT - 1, took


def test_each_read_shares_read_seconds_out_when_there_is_no_call_deadline():
    """The prefetch worker has no call deadline: ``read_seconds`` from the start of each read
    is shared out as a call's would be (the first repository asked gets half, the last one
    the rest, bounded by its own deadline only)."""
    import time
    import uuid

    from walship.errors import Unavailable
    from walship.storage.base import effective_deadline
    from walship.storage.memory import MemoryStorage
    from walship.storage.mirrored import Member, MirroredStorage

    seen: list[tuple[str, float | None]] = []

    class Silent(MemoryStorage):
        def get(self, key):
            seen.append(("primary", effective_deadline(None)))
            raise Unavailable("no answer")

    class Answering(MemoryStorage):
        def get(self, key):
            seen.append(("west", effective_deadline(None)))
            return super().get(key)

    url = f"memory://{uuid.uuid4().hex}"
    west = Answering(f"{url}-w")
    west.put("wal/a", [b"A"])
    storage = MirroredStorage([Member("primary", Silent(url), "primary"),
                               Member("west", west, "sync")])
    try:
        assert storage.get("wal/a").read() == b"A"
        assert seen == [("primary", None), ("west", None)]  # no deadline, no read_seconds
        storage._down.clear()
        seen.clear()
        storage.read_seconds = 10.0
        before = time.monotonic()
        assert storage.get("wal/a").read() == b"A"
        (first, share), (second, last) = seen
        assert (first, second, last) == ("primary", "west", None)
        assert before + 4.9 <= share <= time.monotonic() + 5.0
        assert effective_deadline(None) is None  # (the share ends with the read)
    finally:
        MemoryStorage.forget(url)
        MemoryStorage.forget(f"{url}-w")
