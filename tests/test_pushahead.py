"""Push-ahead: ready files are uploaded once, in parallel, and later calls answer at once."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from walship import fastpath, pushahead, spool
from walship.archive import Archive
from walship.codec import Codec
from walship.config import load_settings
from walship.storage import open_storage
from walship.storage.memory import MemoryStorage

SIZE = 1 << 20


class CountingStorage(MemoryStorage):
    """Counts puts per key."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.puts: dict[str, int] = {}
        self.lock = threading.Lock()

    def put(self, key, data, *, metadata=None):
        with self.lock:
            self.puts[key] = self.puts.get(key, 0) + 1
        return super().put(key, data, metadata=metadata)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    for var in list(os.environ):
        if var.startswith(("WALSHIP_", "AZURE_")):
            monkeypatch.delenv(var)
    url = f"memory://{uuid.uuid4().hex}"
    monkeypatch.setenv("WALSHIP_REPO", url)
    monkeypatch.setenv("WALSHIP_CONFIG", os.devnull)
    wal_dir = tmp_path / "pg_wal"
    (wal_dir / "archive_status").mkdir(parents=True)
    names = [f"0000000100000000{n:08X}" for n in range(1, 13)]
    for name in names:
        (wal_dir / name).write_bytes(os.urandom(1000) + bytes(SIZE - 1000))
        (wal_dir / "archive_status" / f"{name}.ready").touch()
    storage = CountingStorage(url)
    yield wal_dir, names, storage, Archive(storage, Codec())
    MemoryStorage.forget(url)


def archive_like_postgres(wal_dir: Path, names, archive, settings) -> list[str]:
    """Call wal-push for each ready file in order, as PostgreSQL's archiver does."""
    outcomes = []
    for name in names:
        path = str(wal_dir / name)
        if fastpath.wal_push(path):
            outcomes.append("fast")
        else:
            outcomes.append(pushahead.push(archive, settings, path).outcome)
        os.rename(wal_dir / "archive_status" / f"{name}.ready",
                  wal_dir / "archive_status" / f"{name}.done")
    return outcomes


def test_each_file_uploaded_once_and_later_calls_are_fast(setup):
    wal_dir, names, storage, archive = setup
    settings = load_settings({"push_ahead": 4})
    outcomes = archive_like_postgres(wal_dir, names, archive, settings)
    assert outcomes[0] == "stored (+4 ahead)"
    assert outcomes.count("fast") == 9, outcomes  # 12 files, 3 real calls
    assert sorted(storage.puts) == [f"wal/{n}" for n in names]
    assert set(storage.puts.values()) == {1}
    assert not os.listdir(wal_dir / spool.SPOOL / "pushed")  # records consumed
    assert sorted(os.listdir(wal_dir / "archive_status")) == [f"{n}.done" for n in names]


def test_changed_file_is_not_trusted(setup):
    wal_dir, names, storage, archive = setup
    pushahead.push(archive, load_settings({"push_ahead": 2}), str(wal_dir / names[0]))
    (wal_dir / names[1]).write_bytes(bytes(SIZE))  # changed after its push ahead
    assert not fastpath.wal_push(str(wal_dir / names[1]))
    assert fastpath.wal_push(str(wal_dir / names[2]))


def test_other_settings_are_not_trusted(setup, monkeypatch):
    wal_dir, names, storage, archive = setup
    pushahead.push(archive, load_settings({"push_ahead": 2}), str(wal_dir / names[0]))
    monkeypatch.setenv("WALSHIP_REPO", "memory://another-repository")
    assert not fastpath.wal_push(str(wal_dir / names[1]))


def test_concurrent_calls_archive_everything(setup):
    wal_dir, names, storage, archive = setup
    settings = load_settings({"push_ahead": 3})
    errors = []

    def call(name):
        try:
            if not fastpath.wal_push(str(wal_dir / name)):
                pushahead.push(archive, settings, str(wal_dir / name))
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=call, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(storage.puts) == [f"wal/{n}" for n in names]


def test_off_pushes_only_its_own_file(setup):
    wal_dir, names, storage, archive = setup
    pushahead.push(archive, load_settings({"push_ahead": 0}), str(wal_dir / names[0]))
    assert list(storage.puts) == [f"wal/{names[0]}"]


def test_first_call_of_a_backlog_hands_its_file_to_a_background_pusher(
        file_repo_env, tmp_path, monkeypatch, capsys):
    """With more files ready than one call pushes ahead, the first call starts the background
    pusher and lets it upload its file (one storage SDK import instead of two); every file is
    stored once, and later calls answer from the pusher's records."""
    repo = file_repo_env
    monkeypatch.setenv("WALSHIP_PUSH_AHEAD", "3")
    wal_dir = tmp_path / "pg_wal"
    (wal_dir / "archive_status").mkdir(parents=True)
    names = [f"0000000100000000{n:08X}" for n in range(1, 11)]
    data = {}
    for name in names:
        data[name] = os.urandom(1000) + bytes(SIZE - 1000)
        (wal_dir / name).write_bytes(data[name])
        (wal_dir / "archive_status" / f"{name}.ready").touch()
    try:
        for name in names:
            assert fastpath.wal_push(str(wal_dir / name)), name
            os.rename(wal_dir / "archive_status" / f"{name}.ready",
                      wal_dir / "archive_status" / f"{name}.done")
        err = capsys.readouterr().err
        assert f"{names[0]} pushed by the background pusher it started" in err, err
        assert err.count("already pushed ahead") == len(names) - 1, err
    finally:
        deadline = time.monotonic() + 30
        while spool.pusher_alive(str(wal_dir)) and time.monotonic() < deadline:
            time.sleep(0.05)  # it exits once idle
    archive = Archive(open_storage(f"file://{repo}"), Codec())
    for name in names:
        archive.fetch_wal(name, tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == data[name]


def test_no_backlog_or_push_ahead_off_starts_no_pusher(file_repo_env, tmp_path, monkeypatch):
    wal_dir = tmp_path / "pg_wal"
    (wal_dir / "archive_status").mkdir(parents=True)
    for n in range(1, 5):  # 4 ready files: no backlog for push_ahead 8
        (wal_dir / "archive_status" / f"0000000100000000{n:08X}.ready").touch()
    assert not spool.backlog_for_pusher(str(wal_dir))
    for n in range(5, 12):
        (wal_dir / "archive_status" / f"0000000100000000{n:08X}.ready").touch()
    assert spool.backlog_for_pusher(str(wal_dir))
    monkeypatch.setenv("WALSHIP_PUSH_AHEAD", "0")
    assert not spool.backlog_for_pusher(str(wal_dir))
    monkeypatch.setenv("WALSHIP_PUSH_AHEAD", "8")
    monkeypatch.setenv("WALSHIP_REPO", "memory://x")  # no other process can reach it
    assert not spool.backlog_for_pusher(str(wal_dir))



def test_push_ahead_takes_only_regular_files(setup, tmp_path):
    """A .ready whose file is a symbolic link (it could lead to any file), a FIFO (reading it
    would block) or a directory is never pushed ahead; PostgreSQL's own call for it gets the
    plain push's answer."""
    wal_dir, names, storage, archive = setup
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(1000) + bytes(SIZE - 1000))  # would pass as a segment
    linked, fifo, directory = names[1], names[2], names[3]
    (wal_dir / linked).unlink()
    (wal_dir / linked).symlink_to(secret)
    (wal_dir / fifo).unlink()
    os.mkfifo(wal_dir / fifo)
    (wal_dir / directory).unlink()
    (wal_dir / directory).mkdir()
    blocked, done = [], threading.Event()

    def unblock() -> None:  # (without the fix, a reader waits in open() for a writer:
        done.wait(3)        # let it go, as often as it waits, so that the test ends)
        while not done.is_set():
            try:
                os.close(os.open(wal_dir / fifo, os.O_WRONLY | os.O_NONBLOCK))
                blocked.append(True)
            except OSError:
                pass  # no reader: nobody was waiting
            done.wait(0.05)

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        pushahead.push(archive, load_settings({"push_ahead": 5}), str(wal_dir / names[0]))
    finally:
        done.set()
        thread.join()
    assert not blocked
    assert sorted(storage.puts) == [f"wal/{n}" for n in (names[0], *names[4:9])]
