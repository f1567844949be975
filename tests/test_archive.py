"""The archive core's promises, on the in-memory and file:// backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.fixtures.archives import temporary_archive

from walship.archive import Archive
from walship.codec import Codec
from walship.codec.keys import EncryptionKey
from walship.errors import (ContentConflict, ExitStatus, IntegrityError, KeyMismatch,
                            NotFound, RepositoryMismatch, RepositoryMissing, UsageError)
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
    original = (b"1\t0/3000098\tno recovery target specified\n# "
                + os.urandom(30_000).hex().encode() + b"\n")  # (a valid history file)
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
    """In a repository without a marker (written before walship had one) whose marker could
    not be derived in time, the duplicate check still refuses (the stored copy is unreadable
    with this key): the marker check is simulated away here."""
    (tmp_path / "repo").mkdir()
    url = f"file://{tmp_path / 'repo'}"
    path = write(tmp_path, SEG, segment())
    Archive(open_storage(url), Codec(key=EncryptionKey(bytes(32)))).push_wal(path)
    other = Archive(open_storage(url), Codec(key=EncryptionKey(bytes(range(32)))))
    other.check_repository = lambda *args, **kwargs: None
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
    with pytest.raises(RepositoryMismatch, match="encrypted with another key"):
        Archive(open_storage(url), Codec(key=EncryptionKey.generate())).push_wal(
            write(tmp_path, SEG, data))
    assert not (tmp_path / "out2").exists()
    MemoryStorage.forget(url)


# -- one repository, one key, one segment size (the marker walship.json) -----------------------
def wal_keys(storage):
    return [info.key for info in storage.list("wal/")]


def marker(storage):
    with storage.get("walship.json") as download:
        return json.loads(download.read())


def test_first_push_writes_the_marker(tmp_path):
    url = f"memory://{uuid.uuid4().hex}"
    key = EncryptionKey.generate()
    archive = Archive(open_storage(url), Codec(key=key))
    archive.push_wal(write(tmp_path, SEG, segment()))
    assert marker(archive.storage) == {
        "walship": "repository", "layout": 1, "encryption": "aes-256-gcm",
        "key_id": key.key_id.hex(), "wal_segment_size": 1 << 20}
    MemoryStorage.forget(url)


KEY_A, KEY_B = EncryptionKey(bytes(32)), EncryptionKey(bytes(range(32)))


@pytest.mark.parametrize("first, second, message", [
    (KEY_A, KEY_B, "encrypted with another key: key id"),
    (KEY_A, None, "is encrypted .key id [0-9a-f]{16}. and no encryption key is configured"),
    (None, KEY_A, "is not encrypted and an encryption key is configured"),
])
def test_a_push_with_another_key_is_refused_before_storing(tmp_path, first, second, message):
    url = f"memory://{uuid.uuid4().hex}"
    Archive(open_storage(url), Codec(key=first)).push_wal(write(tmp_path, SEG, segment()))
    other = Archive(open_storage(url), Codec(key=second))
    for name, data in [("000000010000000000000002", segment()),
                       ("00000002.history", b"1\t0/3000098\tbefore 2000-01-01\n"),
                       (SEG, segment())]:
        with pytest.raises(RepositoryMismatch, match=message) as caught:
            other.push_wal(write(tmp_path, name, data))
        assert caught.value.status == ExitStatus.CONFLICT == 3
        assert "nothing was stored" in str(caught.value)
    assert wal_keys(other.storage) == [f"wal/{SEG}"]
    MemoryStorage.forget(url)


def test_a_segment_of_another_size_is_refused_before_storing(archive, tmp_path):
    archive.push_wal(write(tmp_path, SEG, segment(1 << 20)))
    with pytest.raises(RepositoryMismatch, match="has 2097152 bytes and the repository") as e:
        archive.push_wal(write(tmp_path, "000000010000000000000002", segment(2 << 20)))
    assert e.value.status == 3
    assert wal_keys(archive.storage) == [f"wal/{SEG}"]
    # other kinds of file have no segment size to match
    archive.push_wal(write(tmp_path, "000000010000000000000001.00000028.backup", b"x\n"))


def test_two_servers_racing_for_the_marker(tmp_path):
    """Both find no marker and nothing stored; the create-only put lets one write it, and the
    other is judged by it (simulated: the first server's whole push lands just before the
    second server's put of the marker)."""
    url = f"memory://{uuid.uuid4().hex}"

    class Racing(MemoryStorage):
        def put(self, key, data, *, metadata=None):
            if key == "walship.json":
                Archive(open_storage(url), Codec(key=KEY_A)).push_wal(
                    write(tmp_path, SEG, segment()))
            return super().put(key, data, metadata=metadata)

    late = Archive(Racing(url), Codec(key=KEY_B))
    (tmp_path / "b").mkdir()
    with pytest.raises(RepositoryMismatch,
                       match="another key.*according to its marker walship.json"):
        late.push_wal(write(tmp_path / "b", "000000010000000000000002", segment()))
    assert late.guard.marker_reads == 2  # none, then the winner's
    assert wal_keys(late.storage) == [f"wal/{SEG}"]
    assert marker(late.storage)["key_id"] == KEY_A.key_id.hex()
    MemoryStorage.forget(url)


def test_a_repository_without_marker_gets_one_from_what_it_holds(tmp_path):
    url = f"memory://{uuid.uuid4().hex}"
    old = Archive(open_storage(url), Codec(key=KEY_A))
    (tmp_path / "old").mkdir()
    old.push_wal(write(tmp_path / "old", SEG, segment(1 << 20)))
    old.storage.delete("walship.json")  # as written before walship had a marker
    # another key: refused, and no marker written (what is stored decides)
    with pytest.raises(RepositoryMismatch,
                       match="another key.*according to the objects it holds"):
        Archive(open_storage(url), Codec(key=KEY_B)).push_wal(
            write(tmp_path, "000000010000000000000002", segment()))
    with pytest.raises(NotFound):
        old.storage.head("walship.json")
    # the same key, a segment of another size: refused, and the marker records the stored size
    with pytest.raises(RepositoryMismatch, match="segments of 1048576 bytes"):
        Archive(open_storage(url), Codec(key=KEY_A)).push_wal(
            write(tmp_path, "000000010000000000000002", segment(2 << 20)))
    assert marker(old.storage)["wal_segment_size"] == 1 << 20
    assert marker(old.storage)["key_id"] == KEY_A.key_id.hex()
    assert wal_keys(old.storage) == [f"wal/{SEG}"]
    MemoryStorage.forget(url)


def test_a_fresh_repository_first_given_a_history_file(tmp_path):
    """No segment size is known yet: no marker until the first segment, but the key is still
    judged by the stored objects."""
    url = f"memory://{uuid.uuid4().hex}"
    archive = Archive(open_storage(url), Codec(key=KEY_A))
    archive.push_wal(write(tmp_path, "00000002.history", b"1\t0/3000098\tx\n"))
    with pytest.raises(NotFound):
        archive.storage.head("walship.json")
    with pytest.raises(RepositoryMismatch, match="no encryption key is configured"):
        Archive(open_storage(url), Codec()).push_wal(write(tmp_path, SEG, segment()))
    archive.push_wal(write(tmp_path, SEG, segment()))
    assert marker(archive.storage)["wal_segment_size"] == 1 << 20
    MemoryStorage.forget(url)


def test_the_verdict_is_remembered_beside_pg_wal(tmp_path):
    """Only the first push of a configuration reads the marker: later calls (new processes,
    here new archives) find the verdict in pg_wal/walship/; another key does not trust it."""
    url = f"memory://{uuid.uuid4().hex}"
    wal_dir = tmp_path / "pg_wal"
    wal_dir.mkdir()
    first = Archive(open_storage(url), Codec(key=KEY_A))
    first.push_wal(write(wal_dir, SEG, segment()))
    assert first.guard.marker_reads == 1
    assert (wal_dir / "walship" / "repository").exists()
    later = Archive(open_storage(url), Codec(key=KEY_A))
    for n in range(2, 5):
        later.push_wal(write(wal_dir, f"0000000100000000000000{n:02X}", segment()))
    assert later.guard.marker_reads == 0
    with pytest.raises(RepositoryMismatch):
        Archive(open_storage(url), Codec(key=KEY_B)).push_wal(
            write(wal_dir, "000000010000000000000009", segment()))
    with pytest.raises(RepositoryMismatch):  # the remembered size is checked too
        later.push_wal(write(wal_dir, "00000001000000000000000A", segment(2 << 20)))
    MemoryStorage.forget(url)


@pytest.mark.parametrize("content", [
    b"", b"garbage\n", bytes(range(256)), b"1\t0/3000098\n3\t0/5000000\n",
    b"2\t0/3000098\tfrom a later timeline\n", b"1\tnot-an-lsn\tx\n",
])
def test_a_history_file_that_is_not_one_is_refused(archive, tmp_path, content):
    with pytest.raises(IntegrityError, match="history file .* is not one") as caught:
        archive.push_wal(write(tmp_path, "00000002.history", content))
    assert caught.value.status == 5
    assert wal_keys(archive.storage) == []


@pytest.mark.parametrize("content", [b"not json", b'{"walship": "other"}', b"[]",
                                     b'{"walship": "repository", "layout": 1, "encryption": '
                                     b'"none", "key_id": null, "wal_segment_size": 1000}',
                                     b'{"walship": "repository", "layout": 1, "encryption": '
                                     b'"none", "key_id": "0011", "wal_segment_size": 1048576}'])
def test_an_unreadable_marker_refuses_every_push(archive, tmp_path, content):
    archive.storage.put("walship.json", [content])
    with pytest.raises(IntegrityError, match="marker .* is unreadable"):
        archive.push_wal(write(tmp_path, SEG, segment()))
    assert wal_keys(archive.storage) == []


def test_a_marker_of_a_newer_layout_says_upgrade(archive, tmp_path):
    archive.storage.put("walship.json", [b'{"walship": "repository", "layout": 2}'])
    with pytest.raises(IntegrityError, match="upgrade walship"):
        archive.push_wal(write(tmp_path, SEG, segment()))


# -- files that are not regular, directories that do not exist, leftovers ----------------------
def _walship(*args: str, env: dict[str, str], cwd) -> tuple[int, str, float]:
    """``walship ARGS`` as its own process (whatever blocks, blocks there: the timeout ends it)."""
    started = time.monotonic()
    tree = str(Path(__file__).resolve().parent.parent)  # this tree's walship, not an installed one
    done = subprocess.run([sys.executable, "-m", "walship", *args], cwd=cwd,
                          env={**env, "PYTHONPATH": tree}, capture_output=True, text=True,
                          timeout=30, check=False)
    return done.returncode, done.stderr, time.monotonic() - started


@pytest.fixture
def clean_env(file_repo_env):
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("WALSHIP_", "AZURE_"))},
            "WALSHIP_REPO": f"file://{file_repo_env}", "WALSHIP_CONFIG": os.devnull}


def test_wal_push_of_a_fifo_is_refused_at_once(tmp_path, clean_env):
    os.mkfifo(tmp_path / SEG)
    status, err, seconds = _walship("wal-push", str(tmp_path / SEG), env=clean_env,
                                    cwd=tmp_path)
    assert status == 2 and "not a regular file" in err and "FIFO" in err, err
    assert seconds < 20


def test_a_key_file_that_is_a_fifo_is_refused_at_once(tmp_path, clean_env):
    os.mkfifo(tmp_path / "key")
    write(tmp_path, SEG, segment())
    status, err, seconds = _walship("wal-push", str(tmp_path / SEG), cwd=tmp_path,
                                    env={**clean_env, "WALSHIP_ENCRYPTION_KEY_FILE":
                                         str(tmp_path / "key")})
    assert status == 2 and "key file" in err and "not a regular file" in err, err
    assert seconds < 20


def test_wal_fetch_creates_no_directory_on_the_way(tmp_path, file_repo_env, capsys):
    from walship.entry import main

    archive = Archive(open_storage(f"file://{file_repo_env}"), Codec())
    archive.push_wal(write(tmp_path, SEG, segment()))
    with pytest.raises(UsageError, match="no directory"):
        archive.fetch_wal(SEG, tmp_path / "missing" / "RECOVERYXLOG")
    assert main(["wal-push", str(tmp_path / SEG)]) == 0
    status = main(["wal-fetch", SEG, str(tmp_path / "absent" / "pg_wal" / "RECOVERYXLOG")])
    assert status == 130 and "no directory" in capsys.readouterr().err  # 2, in recovery
    assert not (tmp_path / "missing").exists() and not (tmp_path / "absent").exists()


def test_leftovers_of_killed_fetches_are_swept_by_age(archive, tmp_path):
    archive.push_wal(write(tmp_path, SEG, segment()))
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    old = [pg_wal / ".RECOVERYXLOG.walship-0a1b2c3d", pg_wal / ".RECOVERYHISTORY.walship-ffff0000"]
    fresh = pg_wal / ".RECOVERYXLOG.walship-12345678"  # a call writing it right now
    others = [pg_wal / ".RECOVERYXLOG.walship-notours", pg_wal / "RECOVERYXLOG.walship-00000000"]
    long_ago = time.time() - 2 * 3600
    for path in (*old, fresh, *others):
        path.write_bytes(b"partial")
    for path in (*old, *others):
        os.utime(path, (long_ago, long_ago))
    archive.fetch_wal(SEG, pg_wal / "RECOVERYXLOG")
    assert not any(path.exists() for path in old)
    assert fresh.exists() and all(path.exists() for path in others)


def test_wal_push_creates_no_directory_on_the_way(tmp_path, file_repo_env, capsys):
    from walship.entry import main

    assert main(["wal-push", str(tmp_path / "absent" / "pg_wal" / SEG)]) == 2
    assert "cannot read WAL file" in capsys.readouterr().err
    assert not (tmp_path / "absent").exists()
