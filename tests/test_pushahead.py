"""Push-ahead: ready files are uploaded once, in parallel, and later calls answer at once."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest

from walship import fastpath, pushahead, spool
from walship.archive import Archive
from walship.codec import Codec
from walship.config import load_settings
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
