"""The archive core's promises, on the in-memory and file:// backends."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.fixtures.archives import temporary_archive

from walship.archive import Archive
from walship.codec import Codec
from walship.codec.keys import EncryptionKey
from walship.errors import (ContentConflict, IntegrityError, KeyMismatch, NotFound,
                            RepositoryMissing, UsageError)
from walship.storage import open_storage
from walship.storage.memory import MemoryStorage

SEG = "000000010000000000000001"


@pytest.fixture(params=["memory", "file"])
def archive(request, tmp_path):
    with temporary_archive(request.param, tmp_path) as made:
        yield made


def write(directory, name, data):
    path = directory / name
    path.write_bytes(data)
    return path


def segment(size=1 << 20):
    return os.urandom(4096) + bytes(size - 4096)


def test_push_fetch_round_trip(archive, tmp_path):
    data = segment()
    result = archive.push_wal(write(tmp_path, SEG, data))
    assert result.outcome == "stored" and result.bytes_in == len(data)
    assert result.bytes_out < len(data) // 10
    fetched = archive.fetch_wal(SEG, tmp_path / "RECOVERYXLOG")
    assert (tmp_path / "RECOVERYXLOG").read_bytes() == data
    assert fetched.bytes_out == len(data)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.parametrize("name,data", [
    ("00000002.history", b"1\t0/3000098\tbefore 2000-01-01\n"),
    ("000000010000000000000002.partial", bytes(1 << 20)),
    ("000000010000000000000002.00000028.backup", b"START WAL LOCATION: 0/2000028\n"),
])
def test_every_archive_file_kind(archive, tmp_path, name, data):
    archive.push_wal(write(tmp_path, name, data))
    archive.fetch_wal(name, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data


def test_identical_repush_succeeds(archive, tmp_path):
    path = write(tmp_path, SEG, segment())
    archive.push_wal(path)
    assert archive.push_wal(path).outcome == "already stored, identical"


@pytest.mark.parametrize("same", [True, False], ids=["identical", "different"])
def test_concurrent_pushes_of_one_name_are_each_accounted_for(archive, tmp_path, same):
    """Six servers push a file of the same name at once: exactly one stores it; every other
    push is told "already stored, identical" (identical content) or refused with
    ContentConflict (different content); nothing else happens, no push goes missing."""
    import threading

    attempts = 6
    common = segment()
    paths = []
    for n in range(attempts):
        (tmp_path / f"server{n}").mkdir()
        paths.append(write(tmp_path / f"server{n}", SEG, common if same else segment()))
    outcomes: dict[str, list[int]] = {}
    start = threading.Barrier(attempts)

    def push(n: int) -> None:
        try:
            start.wait(timeout=30)
            outcome = archive.push_wal(paths[n]).outcome
        except ContentConflict:
            outcome = "conflict"
        except BaseException as error:  # noqa: BLE001 - counted, and the test fails on it
            outcome = f"unexpected {error!r}"
        outcomes.setdefault(outcome, []).append(n)

    threads = [threading.Thread(target=push, args=(n,)) for n in range(attempts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a push hung"
    others = "already stored, identical" if same else "conflict"
    assert set(outcomes) <= {"stored", others}, outcomes
    assert len(outcomes["stored"]) == 1, outcomes
    assert sorted(n for group in outcomes.values() for n in group) == list(range(attempts))
    [winner] = outcomes["stored"]
    archive.fetch_wal(SEG, tmp_path / "fetched")
    assert (tmp_path / "fetched").read_bytes() == paths[winner].read_bytes()


def test_different_content_is_refused_and_original_kept(archive, tmp_path):
    original = segment()
    archive.push_wal(write(tmp_path, SEG, original))
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ContentConflict, match="DIFFERENT"):
        archive.push_wal(write(other, SEG, segment()))
    archive.fetch_wal(SEG, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == original


@pytest.mark.parametrize("change", ["one byte", "longer", "shorter"])
def test_content_differing_anywhere_is_refused(archive, tmp_path, change):
    """The duplicate check compares the whole stored content with the file, to its last byte
    (a file of another size is caught too: history and backup files have no fixed size)."""
    original = os.urandom(3000) + bytes(60_000)
    name = "00000002.history"
    archive.push_wal(write(tmp_path, name, original))
    other = {"one byte": original[:-1] + bytes([original[-1] ^ 1]),
             "longer": original + b"\n", "shorter": original[:-1]}[change]
    (tmp_path / "other").mkdir()
    with pytest.raises(ContentConflict, match="DIFFERENT"):
        archive.push_wal(write(tmp_path / "other", name, other))
    archive.fetch_wal(name, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == original


def test_repush_onto_a_damaged_copy_is_refused_and_says_so(tmp_path):
    (tmp_path / "repo").mkdir()
    archive = Archive(open_storage(f"file://{tmp_path / 'repo'}"), Codec())
    path = write(tmp_path, SEG, segment())
    archive.push_wal(path)
    stored = next((tmp_path / "repo").rglob(SEG))
    raw = bytearray(stored.read_bytes())
    raw[40] ^= 0x10
    stored.write_bytes(bytes(raw))
    with pytest.raises(ContentConflict, match="damaged"):
        archive.push_wal(path)
    assert stored.read_bytes() == bytes(raw)  # left as it is, for the operator to look at


def test_repush_under_another_key_cannot_be_compared(tmp_path):
    (tmp_path / "repo").mkdir()
    url = f"file://{tmp_path / 'repo'}"
    path = write(tmp_path, SEG, segment())
    Archive(open_storage(url), Codec(key=EncryptionKey(bytes(32)))).push_wal(path)
    other = Archive(open_storage(url), Codec(key=EncryptionKey(bytes(range(32)))))
    with pytest.raises(ContentConflict, match="cannot be compared"):
        other.push_wal(path)


def test_missing_file_is_not_found_only_in_a_repository_with_wal(archive, tmp_path):
    with pytest.raises(RepositoryMissing):
        archive.fetch_wal(SEG, tmp_path / "out")
    archive.push_wal(write(tmp_path, SEG, segment()))
    with pytest.raises(NotFound):
        archive.fetch_wal("000000010000000000000002", tmp_path / "out")
    with pytest.raises(NotFound):
        archive.fetch_wal("00000002.history", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_segment_of_impossible_size_is_refused(archive, tmp_path):
    with pytest.raises(IntegrityError, match="power of two"):
        archive.push_wal(write(tmp_path, SEG, bytes(1000)))


def test_bad_names_are_usage_errors(archive, tmp_path):
    with pytest.raises(UsageError):
        archive.push_wal(write(tmp_path, "RECOVERYXLOG", segment()))
    with pytest.raises(UsageError):
        archive.fetch_wal("../../etc/passwd", tmp_path / "out")
    with pytest.raises(UsageError):
        archive.push_wal(tmp_path / "000000010000000000000009")  # does not exist


def test_corrupt_object_is_never_delivered(tmp_path):
    url = f"memory://{uuid.uuid4().hex}"
    storage = open_storage(url)
    archive = Archive(storage, Codec())
    archive.push_wal(write(tmp_path, SEG, segment()))
    body = bytearray(b"".join(iter(lambda d=storage.get("wal/" + SEG): d.read(65536), b"")))
    body[len(body) // 2] ^= 0x40
    storage.replace_raw("wal/" + SEG, bytes(body))
    (tmp_path / "out").write_bytes(b"previous content")
    with pytest.raises(IntegrityError):
        archive.fetch_wal(SEG, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"previous content"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    MemoryStorage.forget(url)


def test_encrypted_round_trip_and_wrong_key(tmp_path):
    url = f"memory://{uuid.uuid4().hex}"
    key = EncryptionKey.generate()
    data = segment()
    Archive(open_storage(url), Codec(key=key)).push_wal(write(tmp_path, SEG, data))
    Archive(open_storage(url), Codec(key=key)).fetch_wal(SEG, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    with pytest.raises(KeyMismatch):
        Archive(open_storage(url), Codec(key=EncryptionKey.generate())).fetch_wal(
            SEG, tmp_path / "out2")
    with pytest.raises(ContentConflict, match="cannot be compared"):
        Archive(open_storage(url), Codec(key=EncryptionKey.generate())).push_wal(
            write(tmp_path, SEG, data))
    assert not (tmp_path / "out2").exists()
    MemoryStorage.forget(url)
