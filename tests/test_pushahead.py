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
from walship.codec.keys import EncryptionKey
from walship.config import load_settings
from walship.entry import main
from walship.errors import RepositoryMismatch
from walship.storage import open_storage
from walship.storage.memory import MemoryStorage

SIZE = 1 << 20


class CountingStorage(MemoryStorage):
    """Counts puts per key (of WAL files: the repository's marker is not counted)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.puts: dict[str, int] = {}
        self.lock = threading.Lock()

    def put(self, key, data, *, metadata=None):
        with self.lock:
            if key.startswith("wal/"):
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



# -- the repository's marker: push-ahead and the background pusher obey it ---------------------
def test_push_ahead_into_a_repository_of_another_key_stores_nothing(setup, tmp_path):
    wal_dir, names, storage, archive = setup
    (tmp_path / "other").mkdir()
    first = tmp_path / "other" / "000000020000000000000001"
    first.write_bytes(bytes(SIZE))
    Archive(storage, Codec(key=EncryptionKey.generate())).push_wal(first)
    with pytest.raises(RepositoryMismatch):
        pushahead.push(archive, load_settings({"push_ahead": 4}), str(wal_dir / names[0]))
    assert list(storage.puts) == ["wal/000000020000000000000001"]
    assert not os.listdir(wal_dir / spool.SPOOL / "pushed")


def test_the_background_pusher_stops_when_the_repository_refuses_it(
        file_repo_env, tmp_path, monkeypatch, capsys):
    """A backlog with another key than the repository's: the call PostgreSQL makes exits 3,
    the background pusher it starts stores nothing, records nothing and exits."""
    repo = file_repo_env
    (tmp_path / "other").mkdir()
    first = tmp_path / "other" / "000000020000000000000001"
    first.write_bytes(bytes(SIZE))
    Archive(open_storage(f"file://{repo}"), Codec(key=EncryptionKey.generate())).push_wal(first)
    key_file = tmp_path / "key"
    key_file.write_text(EncryptionKey.generate().to_text())
    key_file.chmod(0o600)
    monkeypatch.setenv("WALSHIP_ENCRYPTION_KEY_FILE", str(key_file))
    monkeypatch.setenv("WALSHIP_PUSH_AHEAD", "3")
    wal_dir = tmp_path / "pg_wal"
    (wal_dir / "archive_status").mkdir(parents=True)
    names = [f"0000000100000000{n:08X}" for n in range(1, 11)]
    for name in names:
        (wal_dir / name).write_bytes(os.urandom(1000) + bytes(SIZE - 1000))
        (wal_dir / "archive_status" / f"{name}.ready").touch()
    started = time.monotonic()
    try:
        assert main(["wal-push", str(wal_dir / names[0])]) == 3
        assert "encrypted with another key" in capsys.readouterr().err
    finally:
        # (the call fails at once, maybe before the pusher it started has even taken its lock:
        # wait for the pusher's last word, then for it to be gone)
        log = wal_dir / "walship" / "pusher.log"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                log.exists() and "background pusher stopped" in log.read_text()):
            time.sleep(0.05)
        while spool.pusher_alive(str(wal_dir)) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert time.monotonic() - started < 20
    assert not spool.pusher_alive(str(wal_dir))
    assert "background pusher stopped" in log.read_text()
    assert sorted(os.listdir(repo / "wal")) == ["000000020000000000000001"]
    assert not os.listdir(wal_dir / spool.SPOOL / "pushed")


class StuckStorage(MemoryStorage):
    """Fails the put of ``failing`` at once (or stores it, ``failing=None``); every other put
    hangs until ``release`` is set (a storage that stopped answering)."""

    def __init__(self, url: str, failing: str | None) -> None:
        super().__init__(url)
        self.failing = failing
        self.release = threading.Event()

    def put(self, key, data, *, metadata=None):
        from walship.errors import Unavailable

        if not key.startswith("wal/"):  # (the repository's marker)
            return super().put(key, data, metadata=metadata)
        if self.failing is not None and key.endswith(self.failing):
            raise Unavailable(f"cannot store {key}", "refused")
        if self.failing is None and key.endswith("01"):
            return super().put(key, data, metadata=metadata)
        self.release.wait(10)
        return super().put(key, data, metadata=metadata)


def _ready_only(wal_dir: Path, names, keep: int) -> list[str]:
    for name in names[keep:]:
        (wal_dir / "archive_status" / f"{name}.ready").unlink()
    return names[:keep]


def test_a_failed_own_file_fails_the_call_at_once_whatever_the_others_do(setup):
    """The call's own upload fails: the call fails now, abandoning the push-ahead uploads that
    hang (before, it waited for every one of them)."""
    wal_dir, names, _, _ = setup
    names = _ready_only(wal_dir, names, 4)
    storage = StuckStorage(f"memory://{uuid.uuid4().hex}", failing=names[0])
    started = time.monotonic()
    try:
        with pytest.raises(Exception, match="refused"):
            pushahead.push(Archive(storage, Codec()), load_settings(), wal_dir / names[0],
                           time.monotonic() + 30)
        assert time.monotonic() - started < 2
    finally:
        storage.release.set()


def test_push_ahead_is_waited_for_until_the_deadline_at_most(setup):
    """The call's own file is stored; the others hang: the call succeeds at its deadline."""
    wal_dir, names, _, _ = setup
    names = _ready_only(wal_dir, names, 4)
    storage = StuckStorage(f"memory://{uuid.uuid4().hex}", failing=None)
    started = time.monotonic()
    try:
        result = pushahead.push(Archive(storage, Codec()), load_settings(), wal_dir / names[0],
                                time.monotonic() + 1)
        assert 0.9 < time.monotonic() - started < 3
        assert result.name == names[0] and result.outcome.startswith("stored")
    finally:
        storage.release.set()


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
