"""walship.spool: the environment its detached helpers start with, and the safety of the spool
(used only where nobody but walship's own user can change it)."""

from __future__ import annotations

import hashlib
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

import pytest

from walship import spool
from walship.entry import main


def test_helpers_keep_their_heap():
    env = spool.helper_environment({"PATH": "/bin", "WALSHIP_REPO": "file:///r"})
    assert env["PATH"] == "/bin" and env["WALSHIP_REPO"] == "file:///r"
    tunables = dict(t.split("=") for t in env["GLIBC_TUNABLES"].split(":"))
    assert int(tunables["glibc.malloc.trim_threshold"]) >= 8 << 20
    assert int(tunables["glibc.malloc.mmap_threshold"]) > 1 << 20  # zstd's 1 MiB output


def test_helpers_keep_the_callers_own_tunables():
    env = spool.helper_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1:glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"].split(":") == [
        "glibc.malloc.trim_threshold=1", "glibc.malloc.arena_max=2",
        "glibc.malloc.mmap_threshold=4194304"]


def test_settings_fingerprint_ignores_the_tunables():
    env = {"WALSHIP_REPO": "file:///r"}
    assert spool.settings_fingerprint(env) == \
        spool.settings_fingerprint(spool.helper_environment(env))


def test_a_spawned_helper_gets_them(tmp_path, monkeypatch):
    (tmp_path / "envdump.py").write_text(
        "import os, sys\n"
        "open(sys.argv[1] + '.tmp', 'w').write(os.environ.get('GLIBC_TUNABLES', '-'))\n"
        "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n")
    monkeypatch.chdir(tmp_path)  # (python -m finds the module in its working directory)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    out = tmp_path / "seen"
    spool.spawn_detached("envdump", str(out), str(tmp_path / "log"))
    deadline = time.monotonic() + 30
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert out.read_text() == ":".join(spool.MALLOC_TUNABLES), (tmp_path / "log").read_text()
    assert "GLIBC_TUNABLES" not in os.environ


# -- safety: the spool is used only where nobody but walship's own user can change it --------
SEGMENT_SIZE = 1 << 20
NOBODY = pwd.getpwnam("nobody")


def _name(number: int) -> str:
    return f"00000001000000000000{number:04X}"


def _kill_workers(under: Path) -> None:
    """Stop any prefetch worker or pusher whose lock lies under ``under`` (links followed)."""
    for lock in [*under.rglob("worker.lock"), *under.rglob("pusher.lock")]:
        pid = lock.read_text().strip()
        if pid.isdigit() and spool._flock_held(str(lock)):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _untouched(how: str, spooled: Path) -> dict[str, bytes | None]:
    """What must stay as it is of the spool: all of it, but where only its subdirectories are
    links (the spool itself is walship's own, its locks may come and go there)."""
    return {} if how == "linked subdirectory" else _tree(spooled)


@pytest.fixture
def archived(file_repo_env, tmp_path):
    """Three segments in the repository, a source pg_wal with them marked .ready, a victim
    directory full of precious files, and an empty pg_wal to restore into."""
    seed, source = tmp_path / "seed", tmp_path / "source"
    seed.mkdir()
    for n in (1, 2, 3):
        (seed / _name(n)).write_bytes(os.urandom(64) + bytes(SEGMENT_SIZE - 64))
        assert main(["wal-push", str(seed / _name(n))]) == 0
    (source / "archive_status").mkdir(parents=True)
    for n in (4, 5, 6):  # ready, not yet pushed: push-ahead would take them
        (source / _name(n)).write_bytes(os.urandom(64) + bytes(SEGMENT_SIZE - 64))
        (source / "archive_status" / f"{_name(n)}.ready").touch()
    victim = tmp_path / "victim"
    (victim / "prefetch").mkdir(parents=True)
    (victim / "precious").write_text("keep me")
    (victim / "prefetch" / "precious").write_text("keep me too")
    (victim / "pushed").mkdir()
    restore = tmp_path / "pg_wal"
    restore.mkdir()
    yield seed, source, victim, restore
    _kill_workers(tmp_path)


def _plant(directory: Path, how: str, victim: Path) -> None:
    if how == "linked spool":
        (directory / spool.SPOOL).symlink_to(victim)
    elif how == "linked subdirectory":
        (directory / spool.SPOOL).mkdir()
        (directory / spool.SPOOL / "prefetch").symlink_to(victim / "prefetch")
        (directory / spool.SPOOL / "pushed").symlink_to(victim / "pushed")
    elif how == "another user's spool":
        (directory / spool.SPOOL).mkdir()
        os.chown(directory / spool.SPOOL, NOBODY.pw_uid, NOBODY.pw_gid)
    elif how == "spool others may write":
        (directory / spool.SPOOL).mkdir()
        os.chmod(directory / spool.SPOOL, 0o777)


PLANTS = ["linked spool", "linked subdirectory", "another user's spool",
          "spool others may write"]


@pytest.mark.parametrize("how", PLANTS)
def test_wal_fetch_never_uses_a_spool_it_cannot_trust(archived, capsys, how):
    """A symbolic link where the spool or its cache should be, a spool of another user or one
    others may write to: wal-fetch transfers directly, touches nothing in or through it, and
    starts no worker there (whose cleanup would delete what it finds)."""
    seed, _, victim, restore = archived
    _plant(restore, how, victim)
    spooled = restore / spool.SPOOL
    before, victim_before = _untouched(how, spooled), _tree(victim)
    for n in (1, 2):
        assert main(["wal-fetch", _name(n), str(restore / "RECOVERYXLOG")]) == 0
        assert (restore / "RECOVERYXLOG").read_bytes() == (seed / _name(n)).read_bytes()
    time.sleep(1.5)  # a worker started anyway would have begun its cleanup by now
    assert _tree(victim) == victim_before
    assert _untouched(how, spooled) == before
    err = capsys.readouterr().err
    assert "delivered from prefetch cache" not in err
    assert f"{spooled} not used" in err and "transferring directly" in err, err


@pytest.mark.parametrize("how", PLANTS)
def test_wal_push_never_uses_a_spool_it_cannot_trust(archived, capsys, how):
    _, source, victim, _ = archived
    _plant(source, how, victim)
    spooled = source / spool.SPOOL
    before, victim_before = _untouched(how, spooled), _tree(victim)
    assert main(["wal-push", str(source / _name(4))]) == 0
    assert _tree(victim) == victim_before and _untouched(how, spooled) == before
    assert main(["wal-push", str(source / _name(5))]) == 0  # really pushed: nothing ahead
    assert _tree(victim) == victim_before and _untouched(how, spooled) == before
    err = capsys.readouterr().err
    assert err.count(f"{spooled} not used") == 2 and f"{_name(5)} stored" in err, err


def test_safe_dir(tmp_path):
    base = tmp_path / "pg_wal"
    base.mkdir()
    inside = str(base / "walship" / "prefetch")
    assert not spool.safe_dir(str(base), inside)  # missing
    assert spool.safe_dir(str(base), inside, create=True)
    assert oct(os.stat(base / "walship").st_mode & 0o777) == "0o700"
    assert not spool.safe_dir(str(tmp_path / "missing"), str(tmp_path / "missing" / "walship"),
                              create=True)
    assert not (tmp_path / "missing").exists()  # never a directory on the way
    assert not spool.safe_dir(str(base), str(tmp_path / "elsewhere"), create=True)
    assert not spool.safe_dir(str(base), str(base / ".." / "x"), create=True)
    os.chmod(base, 0o775)  # pg_wal itself writable by others: nothing in it is safe
    assert not spool.safe_dir(str(base), inside)
    os.chmod(base, 0o700)
    linked = tmp_path / "linked"
    linked.symlink_to(base)  # pg_wal may be a link (initdb --waldir) ...
    assert spool.safe_dir(str(linked), str(linked / "walship" / "prefetch"))
    os.rename(base / "walship" / "prefetch", tmp_path / "real")
    (base / "walship" / "prefetch").symlink_to(tmp_path / "real")  # ... its spool never
    assert not spool.safe_dir(str(base), inside)


def test_file_fingerprint_refuses_a_fifo_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError):
        spool.file_fingerprint(str(tmp_path / "fifo"))  # (before: blocked for a writer)


def test_root_leaves_nothing_the_postgres_user_cannot_use(pg, monkeypatch):
    """wal-push and wal-fetch run by hand as root in the postgres user's pg_wal and
    repository: every file and directory left there is the postgres user's, and its later
    calls (push-ahead, prefetch, reading the delivered file) all work."""
    if pg.user is None:
        pytest.skip("not running as root")
    from tests.fixtures.postgres import _as_user, chown_to

    user = pg.user
    repo = pg.make_dir(pg.path / "repo", 0o750)
    source = pg.make_dir(pg.path / "source", 0o700)
    pg.make_dir(source / "archive_status", 0o700)
    for n in (1, 2, 3, 4):
        (source / _name(n)).write_bytes(os.urandom(64) + bytes(SEGMENT_SIZE - 64))
        (source / "archive_status" / f"{_name(n)}.ready").touch()
        chown_to(source / _name(n), user)
        chown_to(source / "archive_status" / f"{_name(n)}.ready", user)
    restore = pg.make_dir(pg.path / "pg_wal", 0o700)
    for var in list(os.environ):
        if var.startswith(("WALSHIP_", "AZURE_")):
            monkeypatch.delenv(var)
    env = {"WALSHIP_REPO": f"file://{repo}", "WALSHIP_CONFIG": os.devnull}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        assert main(["wal-push", str(source / _name(1))]) == 0  # as root
        assert main(["wal-fetch", _name(1), str(restore / "RECOVERYXLOG")]) == 0
        others = [str(p) for p in pg.path.rglob("*") if p.lstat().st_uid != user.pw_uid]
        assert others == [], "left by root, not the postgres user's"

        def as_postgres(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(list(args), env={**env, "PATH": "/usr/bin:/bin",
                                                   "HOME": str(pg.path)},
                                  capture_output=True, text=True, timeout=120, cwd=pg.path,
                                  check=False, **_as_user(user))

        read = as_postgres("sha256sum", str(restore / "RECOVERYXLOG"))
        assert read.returncode == 0, read.stderr
        assert read.stdout.split()[0] == hashlib.sha256(
            (source / _name(1)).read_bytes()).hexdigest()
        for n in (2, 3, 4):  # (2 pushes 3 and 4 ahead, whose calls are answered at once)
            done = as_postgres(pg.walship, "wal-push", str(source / _name(n)))
            assert done.returncode == 0, done.stderr
        assert "already pushed ahead" in done.stderr
        for n in (1, 2, 3):
            done = as_postgres(pg.walship, "wal-fetch", _name(n), "pg_wal/RECOVERYXLOG")
            assert done.returncode == 0, done.stderr
            assert (restore / "RECOVERYXLOG").read_bytes() == (source / _name(n)).read_bytes()
        assert (restore / spool.SPOOL / "prefetch").stat().st_uid == user.pw_uid  # its own
    finally:
        _kill_workers(pg.path)
