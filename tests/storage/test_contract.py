"""The storage contract (walship.storage.base), checked against every backend.

The ``storage`` fixture (tests/storage/conftest.py) yields a fresh, empty repository of each
backend in turn: memory, file:// and Azure (Azurite).
"""

from __future__ import annotations

import os
import threading

import pytest

from walship.errors import AlreadyExists, NotFound, UsageError
from walship.storage.base import ObjectInfo, Storage


def read_all(storage: Storage, key: str) -> bytes:
    with storage.get(key) as download:
        parts = []
        while chunk := download.read(65536):
            parts.append(chunk)
        return b"".join(parts)


def test_is_a_storage(storage):
    assert isinstance(storage, Storage)


@pytest.mark.parametrize("size", [0, 1, 1000, 5 * 1024 * 1024 + 17])
def test_put_then_get_round_trips(storage, size):
    data = os.urandom(size)
    chunks = [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)] or [b""]
    info = storage.put("a/b/object", iter(chunks), metadata=lambda: {"digest": "abc"})
    assert info.key == "a/b/object" and info.size == size
    assert read_all(storage, "a/b/object") == data
    head = storage.head("a/b/object")
    assert head.size == size and head.metadata == {"digest": "abc"}
    with storage.get("a/b/object") as download:
        assert download.info.size == size
        assert download.info.metadata == {"digest": "abc"}


def test_metadata_is_taken_after_the_data(storage):
    seen = []

    def data():
        seen.append("x")
        yield b"payload"

    storage.put("k", data(), metadata=lambda: {"n": str(len(seen))})
    assert storage.head("k").metadata == {"n": "1"}


def test_put_is_create_only_and_leaves_the_original(storage):
    storage.put("k", [b"first"], metadata=lambda: {"v": "1"})
    with pytest.raises(AlreadyExists):
        storage.put("k", [b"second, longer"], metadata=lambda: {"v": "2"})
    assert read_all(storage, "k") == b"first"
    assert storage.head("k").metadata == {"v": "1"}


def test_large_put_is_create_only(storage):
    big = os.urandom(9 * 1024 * 1024)
    storage.put("big", [big[: 1 << 20], big[1 << 20:]])
    with pytest.raises(AlreadyExists):
        storage.put("big", [os.urandom(1 << 20) for _ in range(9)])
    assert read_all(storage, "big") == big


def test_missing_object_is_not_found(storage):
    with pytest.raises(NotFound):
        storage.get("nope")
    with pytest.raises(NotFound):
        storage.head("dir/nope")


def test_failed_put_leaves_nothing_visible(storage):
    def broken():
        yield b"partial data"
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        storage.put("p", broken())
    with pytest.raises(NotFound):
        storage.head("p")
    assert [i.key for i in storage.list("")] == []
    storage.put("p", [b"complete"])  # the name is still free
    assert read_all(storage, "p") == b"complete"


def test_list_is_sorted_filtered_and_complete(storage):
    for key in ["wal/00000002.history", "wal/000000010000000000000002",
                "wal/000000010000000000000001", "backups/x/manifest", "wal/00000002000000000000000A"]:
        storage.put(key, [key.encode()])
    listed = list(storage.list("wal/00000001"))
    assert [i.key for i in listed] == ["wal/000000010000000000000001",
                                       "wal/000000010000000000000002"]
    assert all(isinstance(i, ObjectInfo) and i.size == len(i.key) for i in listed)
    assert [i.key for i in storage.list("wal/00000002")] == [
        "wal/00000002.history", "wal/00000002000000000000000A"]
    assert len(list(storage.list(""))) == 5
    assert list(storage.list("zzz")) == []


def test_list_stops_at_its_limit(storage):
    keys = [f"wal/{n:024X}" for n in range(1, 6)]
    for key in reversed(keys):
        storage.put(key, [b"x"])
    storage.put("backups/b/manifest", [b"y"])
    assert [i.key for i in storage.list("wal/", limit=1)] == keys[:1]
    assert [i.key for i in storage.list("wal/", limit=3)] == keys[:3]
    assert [i.key for i in storage.list("wal/", limit=50)] == keys
    assert list(storage.list("wal/", limit=0)) == []
    assert [i.key for i in storage.list("", limit=1)] == ["backups/b/manifest"]
    assert list(storage.list("zzz", limit=1)) == []


def test_delete_is_idempotent(storage):
    storage.put("d", [b"x"])
    storage.delete("d")
    storage.delete("d")
    with pytest.raises(NotFound):
        storage.head("d")
    storage.put("d", [b"again"])
    assert read_all(storage, "d") == b"again"


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../x", "a/../b", ".hidden", "a/.tmp", "sp ace",
                                 "wal/x\n", "a\n/b"])
def test_invalid_keys_are_refused(storage, key):
    with pytest.raises(UsageError):
        storage.put(key, [b"x"])


@pytest.mark.parametrize("name", ["Upper", "digest\n", "a-b", ""])
def test_invalid_metadata_names_are_refused(storage, name):
    with pytest.raises(UsageError):
        storage.put("m", [b"x"], metadata=lambda: {name: "v"})


def test_concurrent_creates_one_wins(storage):
    """Every attempt is accounted for: exactly one creates the object, every other one is told
    AlreadyExists; no attempt raises anything else, hangs or goes missing."""
    attempts = 6
    created: list[int] = []
    refused: list[int] = []
    failed: list[tuple[int, str]] = []
    start = threading.Barrier(attempts)

    def push(n):
        try:
            start.wait(timeout=30)  # all at once, so that the creates really race
            storage.put("race", [str(n).encode() * 1000])
            created.append(n)
        except AlreadyExists:
            refused.append(n)
        except BaseException as error:  # noqa: BLE001 - counted, and the test fails on it
            failed.append((n, repr(error)))

    threads = [threading.Thread(target=push, args=(n,)) for n in range(attempts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a create hung"
    assert failed == []
    assert len(created) == 1, (created, refused)
    assert sorted(created + refused) == list(range(attempts))
    assert read_all(storage, "race") == str(created[0]).encode() * 1000


def test_an_object_larger_than_one_request_round_trips(storage):
    """Above 17 MiB (the largest single-request put) an Azure object goes up as staged blocks
    through the SDK, with the service version the REST transport speaks: a strict Azurite
    refuses the SDK's newest one."""
    from walship.storage import azure

    data = os.urandom(azure.SINGLE_PUT_MAX + (1 << 20) + 3)
    storage.put("huge", (data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)),
                metadata=lambda: {"digest": "abc"})
    assert storage.head("huge").size == len(data)
    assert read_all(storage, "huge") == data
    with pytest.raises(AlreadyExists):
        storage.put("huge", [b"other"])


def test_read_in_small_pieces(storage):
    data = os.urandom(300_000)
    storage.put("small-reads", [data])
    with storage.get("small-reads") as download:
        got = bytearray()
        while piece := download.read(4097):
            assert len(piece) <= 4097
            got += piece
    assert bytes(got) == data


def test_modified_time_is_reported_by_head_get_and_list(storage):
    import time

    before = time.time()
    storage.put("m/first", [b"one"])
    after = time.time()
    # Whole-second resolution (Azure) and a little clock slack between client and service.
    infos = [storage.head("m/first"), *storage.list("m/")]
    with storage.get("m/first") as download:
        infos.append(download.info)
    for info in infos:
        assert info.modified is not None, info
        assert before - 2 <= info.modified <= after + 2, (info, before, after)
    time.sleep(1.1)
    storage.put("m/second", [b"two"])
    first, second = storage.list("m/")
    assert second.modified is not None and first.modified is not None
    assert second.modified >= first.modified
