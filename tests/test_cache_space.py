"""The prefetch cache and the space of its filesystem: the floor it leaves free, a full
filesystem (never an internal error), and the cache_dir setting (a cache elsewhere, delivered by
a copy). Small filesystems are tmpfs mounted by the tests (they run as root)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Self

import pytest

from walship import prefetch, spool
from walship.entry import main

SEGMENT = 1 << 20  # wal_segment_size = 1 MB: the smallest, for speed
MIB = 1 << 20


def name(number: int) -> str:
    return f"0000000100000000{number:08X}"


@pytest.fixture
def repo(tmp_path, monkeypatch) -> dict[str, bytes]:
    """A file:// repository holding segments 1-16 of timeline 1; the environment cleaned."""
    for var in list(os.environ):
        if var.startswith(("WALSHIP_", "AZURE_")):
            monkeypatch.delenv(var)
    (tmp_path / "repo").mkdir()
    monkeypatch.setenv("WALSHIP_REPO", f"file://{tmp_path / 'repo'}")
    monkeypatch.setenv("WALSHIP_CONFIG", os.devnull)
    source = tmp_path / "source"
    source.mkdir()
    originals = {}
    for n in range(1, 17):
        data = os.urandom(1000) + n.to_bytes(4, "big") * 100 + bytes(SEGMENT - 1400)
        (source / name(n)).write_bytes(data)
        assert main(["wal-push", str(source / name(n))]) == 0
        originals[name(n)] = data
    return originals


def _stop_worker(cache: Path) -> None:
    try:
        pid = int((cache / "worker.lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if spool.worker_alive(str(cache)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while spool.worker_alive(str(cache)) and time.monotonic() < deadline:
            time.sleep(0.01)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, kib): a tmpfs of that size at tmp_path/name, unmounted at the end (after the
    prefetch workers whose caches are in it are stopped)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(where: str, kib: int) -> Path:
        path = tmp_path / where
        path.mkdir()
        # (mode 0700: a pg_wal others may write to is never given a spool)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=0700", "tmpfs",
                        str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        for lock in path.rglob("worker.lock"):
            _stop_worker(lock.parent)
        subprocess.run(["umount", "-l", str(path)], check=False)


def fetch(destination: Path, wal_name: str, capsys) -> tuple[int, str]:
    status = main(["wal-fetch", wal_name, str(destination)])
    return status, capsys.readouterr().err


def wait_for(predicate, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


class FreeSpace(threading.Thread):
    """The least free space seen on a filesystem while it runs."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.least = 1 << 62
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.002):
            st = os.statvfs(self.path)
            self.least = min(self.least, st.f_bavail * st.f_frsize)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()


# -- the floor ------------------------------------------------------------------------------------
def test_the_floor_is_max_wal_size_and_two_segments_unless_set():
    assert prefetch.free_space_floor(None, 16 * MIB, None) == (1 << 30) + 32 * MIB
    assert prefetch.free_space_floor(None, 16 * MIB, 64 * MIB) == 96 * MIB
    assert prefetch.free_space_floor(None, 64 * MIB, 64 * MIB) == 192 * MIB
    assert prefetch.free_space_floor(10, 16 * MIB, 64 * MIB) == 10 * MIB
    assert prefetch.free_space_floor(0, 16 * MIB, None) == 0


def test_max_wal_size_is_read_from_the_data_directory(tmp_path):
    assert prefetch.read_max_wal_size(None) is None
    assert prefetch.read_max_wal_size(str(tmp_path)) is None
    (tmp_path / "postgresql.conf").write_text(
        "#max_wal_size = 1GB\nmax_wal_size = 2GB   # more\nmin_wal_size = 80MB\n")
    assert prefetch.read_max_wal_size(str(tmp_path)) == 2 << 30
    (tmp_path / "postgresql.auto.conf").write_text(  # read after postgresql.conf: it wins
        "max_wal_size = '512MB'\nMAX_WAL_SIZE = 96\n")
    assert prefetch.read_max_wal_size(str(tmp_path)) == 96 * MIB
    (tmp_path / "postgresql.auto.conf").write_text("max_wal_size = '4096kB'\n")
    assert prefetch.read_max_wal_size(str(tmp_path)) == 4 * MIB
    (tmp_path / "postgresql.auto.conf").write_text("max_wal_size = 'lots'\n")  # not told
    assert prefetch.read_max_wal_size(str(tmp_path)) == 2 << 30


def test_data_directory_is_above_pg_wal_or_the_working_directory(tmp_path, monkeypatch):
    data = tmp_path / "data"
    cache = data / "pg_wal" / "walship" / "prefetch"
    cache.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert prefetch.data_directory(str(cache)) is None  # no PG_VERSION: not a data directory
    (data / "PG_VERSION").write_text("15\n")
    assert prefetch.data_directory(str(cache)) == str(data)
    monkeypatch.chdir(data)  # PostgreSQL runs restore_command here
    assert prefetch.data_directory("/elsewhere/pg_wal-1-2") == str(data)


def test_the_worker_leaves_the_floor_free(repo, tmpfs, capsys, monkeypatch):
    """pg_wal on an 8 MiB filesystem, a floor of 4 MiB, a window of 8 segments of 1 MiB: the
    worker caches what fits above the floor and no more; the calls still get every segment."""
    pg_wal = tmpfs("pg_wal", 8192)
    monkeypatch.setenv("WALSHIP_CACHE_MIN_FREE_MB", "4")
    cache = Path(spool.cache_dir(str(pg_wal)))
    destination = pg_wal / "RECOVERYXLOG"
    slack = 64 << 10  # seals, markers, the window file: a few pages each
    with FreeSpace(pg_wal) as settled:
        status, err = fetch(destination, name(1), capsys)
        assert status == 0, err
        destination.unlink()  # (PostgreSQL reads it, then it is replaced by the next)
        assert wait_for(lambda: len(list(cache.glob("*.ok"))) >= 1)
        time.sleep(1.5)  # every download the window wants has had time to start
    assert 1 <= len(list(cache.glob("*.ok"))) <= 4
    assert settled.least >= 4 * MIB - slack, settled.least
    log = (cache / "worker.log").read_text()
    assert "under the floor of 4 MiB and a segment: not caching ahead" in log, log
    with FreeSpace(pg_wal) as replay:
        for n in range(2, 14):
            status, err = fetch(destination, name(n), capsys)
            assert status == 0, err
            assert destination.read_bytes() == repo[name(n)]
            destination.unlink()
    # A call's own segment (looked up by the worker, or downloaded by the call) may take one
    # segment's room under the floor; the cache's window never does.
    assert replay.least >= 3 * MIB - slack, replay.least


def test_a_window_download_that_finds_no_space_pauses_the_window(repo, tmpfs, monkeypatch,
                                                                 capsys):
    """The filesystem fills under the worker's feet (here: it is told of more room than there
    is): the downloads that find no space fail cleanly, leave nothing behind, and the window
    pauses instead of retrying at once; the worker goes on."""
    pg_wal = tmpfs("pg_wal", 2560)  # room for two segments, not for the window of eight
    monkeypatch.setenv("WALSHIP_CACHE_MIN_FREE_MB", "0")
    cache = Path(spool.cache_dir(str(pg_wal)))
    assert spool.safe_dir(str(pg_wal), str(cache), create=True)
    plenty = os.statvfs_result((4096, 4096, 1 << 20, 1 << 20, 1 << 20, 0, 0, 0, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda path: plenty)
    worker = prefetch.Worker(str(cache))
    try:
        want = (name(1), SEGMENT)
        worker.step(want)
        assert len(worker.inflight) == 8
        assert wait_for(lambda: all(future.done() for future in worker.inflight.values()))
        worker.step(want)  # collects the downloads that ended
        assert worker.full_until > time.monotonic()
        assert not worker.inflight  # nothing new during the pause
        err = capsys.readouterr().err
        assert "no space left on its filesystem" in err and "internal error" not in err, err
        assert 1 <= len(list(cache.glob("*.ok"))) <= 2
        assert not [p for p in cache.iterdir() if ".walship-" in p.name or ".tmp" in p.name]
        worker.full_until = 0.0
        worker.retry_at.clear()  # (and its back-off)
        worker.step(want)  # the pause over: it tries again
        assert worker.inflight
    finally:
        worker.close()


def test_a_lookup_whose_answer_finds_no_space_makes_room_and_says_error(repo, tmp_path,
                                                                        monkeypatch):
    """The caller waits for the answer: on a full filesystem the worker drops the segment it
    looked up to make room for it, and answers "error" (the caller then downloads itself)."""
    cache = tmp_path / "pg_wal" / "walship" / "prefetch"
    (cache / "ask").mkdir(parents=True)
    worker = prefetch.Worker(str(cache))
    real = spool.write_atomically
    failed: list[str] = []

    def write_atomically(path: str, text: str) -> None:
        if path.endswith(".answer") and not failed:
            failed.append(text)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, text)

    monkeypatch.setattr(spool, "write_atomically", write_atomically)
    try:
        worker.lookup(name(3), "0123abcd", worker.fingerprint)
    finally:
        worker.close()
    assert failed == ["0123abcd found\n"]
    assert (cache / "ask" / f"{name(3)}.answer").read_text() == "0123abcd error\n"
    assert not (cache / name(3)).exists() and not (cache / f"{name(3)}.ok").exists()


# -- a full filesystem -----------------------------------------------------------------------------
@pytest.mark.parametrize("depth", ["8", "0"])
def test_no_space_for_the_segment_is_one_clear_line_and_stops_recovery(repo, tmpfs, capsys,
                                                                      monkeypatch, depth):
    pg_wal = tmpfs("pg_wal", 2048)
    monkeypatch.setenv("WALSHIP_PREFETCH", depth)
    monkeypatch.setenv("WALSHIP_CACHE_MIN_FREE_MB", "0")
    with open(pg_wal / "filler", "wb") as filler:  # leaves half a segment free
        filler.write(bytes(2048 * 1024 - SEGMENT // 2))
    status, err = fetch(pg_wal / "RECOVERYXLOG", name(1), capsys)
    assert status == 134, err
    assert "internal error" not in err and "no space left" in err, err
    assert f"cannot write {name(1)} into {pg_wal}" in err, err
    assert sorted(p.name for p in pg_wal.iterdir() if p.name != "walship") == ["filler"]
    assert not [p for p in pg_wal.rglob("*") if ".walship-" in p.name]


def test_the_archive_says_disk_full(repo, tmpfs):
    from walship.archive import open_archive
    from walship.config import load_settings
    from walship.errors import DiskFull

    small = tmpfs("small", 512)
    archive = open_archive(load_settings())
    with pytest.raises(DiskFull) as raised:
        archive.fetch_wal(name(3), small / "x")
    assert raised.value.status == 6 and "no space left" in raised.value.one_line()
    assert list(small.iterdir()) == []


# -- the cache_dir setting -------------------------------------------------------------------------
def test_cache_dir_puts_the_cache_elsewhere_one_per_pg_wal(repo, tmp_path, capsys, monkeypatch):
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    home = tmp_path / "cachehome"
    home.mkdir()
    monkeypatch.setenv("WALSHIP_CACHE_DIR", str(home))
    cache = Path(spool.cache_dir(str(pg_wal), str(home)))
    st = pg_wal.stat()
    assert cache == home / f"pg_wal-{st.st_dev:x}-{st.st_ino:x}"
    try:
        from_cache = 0
        for n in range(1, 13):
            status, err = fetch(pg_wal / "RECOVERYXLOG", name(n), capsys)
            assert status == 0, err
            assert (pg_wal / "RECOVERYXLOG").read_bytes() == repo[name(n)]
            from_cache += "prefetch cache" in err
            if n == 1:
                assert wait_for(lambda: len(list(cache.glob("*.ok"))) >= 4)
        assert from_cache >= 8, from_cache
        assert spool.worker_alive(str(cache))
        assert not (pg_wal / "walship").exists()
        assert [p.name for p in home.iterdir()] == [cache.name]
    finally:
        _stop_worker(cache)


def test_a_cache_on_another_filesystem_is_delivered_by_a_copy(repo, tmp_path, tmpfs, capsys,
                                                             monkeypatch):
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    home = tmpfs("cachehome", 64 << 10)
    assert home.stat().st_dev != pg_wal.stat().st_dev
    monkeypatch.setenv("WALSHIP_CACHE_DIR", str(home))
    monkeypatch.setenv("WALSHIP_CACHE_MIN_FREE_MB", "8")  # (the floor is the cache's own)
    cache = Path(spool.cache_dir(str(pg_wal), str(home)))
    from_cache = 0
    for n in range(1, 13):
        status, err = fetch(pg_wal / "RECOVERYXLOG", name(n), capsys)
        assert status == 0, err
        assert (pg_wal / "RECOVERYXLOG").read_bytes() == repo[name(n)]
        assert time.time() - (pg_wal / "RECOVERYXLOG").stat().st_mtime < 60
        delivered = "prefetch cache" in err
        from_cache += delivered
        if n == 1:
            assert wait_for(lambda: len(list(cache.glob("*.ok"))) >= 4)

        def gone(n: int = n) -> bool:
            return not (cache / name(n)).exists() and not (cache / f"{name(n)}.ok").exists()

        # Delivered from the cache: the copy's source is dropped by the call itself. Downloaded
        # directly (the worker had not queued it yet), the worker may still be finishing its
        # own copy, which it sweeps as soon as it sees the window moved past it.
        assert gone() if delivered else wait_for(gone, 10), (n, delivered)
    assert from_cache >= 8, from_cache
    assert sorted(p.name for p in pg_wal.iterdir()) == ["RECOVERYXLOG"]  # no temporary file


def test_a_copy_whose_source_changes_meanwhile_is_not_delivered(tmp_path, monkeypatch):
    cache, wal = tmp_path / "cache", tmp_path / "pg_wal"
    cache.mkdir()
    wal.mkdir()
    (cache / name(1)).write_bytes(os.urandom(SEGMENT))
    settings = spool.settings_fingerprint()
    spool.seal_cached(str(cache), name(1), settings)
    real_sendfile = os.sendfile

    def sendfile(out: int, source: int, offset: int, count: int) -> int:
        with open(cache / name(1), "r+b") as handle:  # a write during the copy moves the mtime
            handle.write(b"changed")
        return real_sendfile(out, source, offset, count)

    monkeypatch.setattr(os, "sendfile", sendfile)
    assert not spool._copy_sealed(str(cache / name(1)), str(wal / "RECOVERYXLOG"), SEGMENT)
    assert list(wal.iterdir()) == []


def test_a_missing_cache_dir_is_a_clear_configuration_error(repo, tmp_path, capsys,
                                                            monkeypatch):
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    monkeypatch.setenv("WALSHIP_CACHE_DIR", str(tmp_path / "nowhere" / "cache"))
    status, err = fetch(pg_wal / "RECOVERYXLOG", name(1), capsys)
    assert status == 130 and "cache_dir" in err and "does not exist" in err, err
    assert not (tmp_path / "nowhere").exists() and list(pg_wal.iterdir()) == []
    monkeypatch.setenv("WALSHIP_CACHE_DIR", "relative/cache")
    status, err = fetch(pg_wal / "RECOVERYXLOG", name(1), capsys)
    assert status == 130 and "invalid cache_dir" in err and "absolute path" in err, err


def test_an_unwritable_cache_dir_is_said_and_the_call_downloads_itself(repo, tmp_path, capsys,
                                                                       monkeypatch):
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    home = tmp_path / "cachehome"
    home.mkdir()
    cache = Path(spool.cache_dir(str(pg_wal), str(home)))
    cache.write_text("not a directory\n")  # (as root, permissions would not stop us)
    monkeypatch.setenv("WALSHIP_CACHE_DIR", str(home))
    status, err = fetch(pg_wal / "RECOVERYXLOG", name(2), capsys)
    assert status == 0 and f"cannot use the cache_dir {home}" in err, err
    assert (pg_wal / "RECOVERYXLOG").read_bytes() == repo[name(2)]


def test_cache_dir_as_the_fast_path_reads_it(tmp_path, monkeypatch):
    for var in ("WALSHIP_CACHE_DIR", "WALSHIP_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    config = tmp_path / "walship.toml"
    monkeypatch.setenv("WALSHIP_CONFIG", str(config))
    assert spool.configured_cache_dir() is None  # no config file
    config.write_text('repo = "file:///r"\n# cache_dir = "/not/this"\n')
    assert spool.configured_cache_dir() is None  # mentioned, not set
    config.write_text('repo = "file:///r"\ncache_dir = "/var/cache/walship"\n')
    assert spool.configured_cache_dir() == "/var/cache/walship"
    monkeypatch.setenv("WALSHIP_CACHE_DIR", "/run/walship")  # the environment first
    assert spool.configured_cache_dir() == "/run/walship"
    monkeypatch.setenv("WALSHIP_CACHE_DIR", "")  # empty: unset, as in walship.config
    assert spool.configured_cache_dir() == "/var/cache/walship"
    monkeypatch.setenv("WALSHIP_CACHE_DIR", "run/walship")
    with pytest.raises(ValueError):
        spool.configured_cache_dir()
    monkeypatch.setenv("WALSHIP_CACHE_DIR", "")
    config.write_text('cache_dir = "relative"\n')
    with pytest.raises(ValueError):
        spool.configured_cache_dir()


def test_cache_settings_are_validated(tmp_path):
    from walship.config import load_settings
    from walship.errors import ConfigError

    env = {"WALSHIP_CONFIG": os.devnull}
    settings = load_settings(environ=env)
    assert settings.cache_dir is None and settings.cache_min_free_mb is None
    settings = load_settings(environ={**env, "WALSHIP_CACHE_DIR": "/var/cache/walship",
                                      "WALSHIP_CACHE_MIN_FREE_MB": "0"})
    assert settings.cache_dir == "/var/cache/walship" and settings.cache_min_free_mb == 0
    for variable, value in (("WALSHIP_CACHE_DIR", "cache"), ("WALSHIP_CACHE_DIR", "/a\nb"),
                            ("WALSHIP_CACHE_MIN_FREE_MB", "-1"),
                            ("WALSHIP_CACHE_MIN_FREE_MB", "lots")):
        with pytest.raises(ConfigError) as raised:
            load_settings(environ={**env, variable: value})
        assert "\n" not in raised.value.one_line()
