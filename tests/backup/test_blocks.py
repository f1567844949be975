"""Block-level deltas of large relation files (walship.backup.blocks): the block map format,
block members, which files qualify; then on a fake server (no PostgreSQL) what a diff or incr
stores of a large relation file (only its changed blocks), how restore and backup-verify
rebuild it along the chain and check its final SHA-256 and size, the change-detection corner
cases at block level, the change-source seam, and a damaged or missing object of a parent (a
piece, a block map, a part) failing the child loudly with nothing startable left."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from tests.backup.test_incremental import Source, expected, push, restored, snapshot
from tests.backup.test_pipeline import make_cluster, push_wal_names
from tests.fixtures.archives import temporary_archive
from walship.archive import Archive
from walship.backup import blocks, layout
from walship.backup.fetch import fetch_backup
from walship.backup.manifest import PIECE_BLOCKS, PIECE_FILE, FileEntry, Manifest, PartEntry, Piece
from walship.backup.push import push_backup, unchanged_files
from walship.backup.verify import verify_backup
from walship.codec import Codec
from walship.errors import IntegrityError
from walship.storage import open_storage

B = 8192
BIG = "base/5/16384"  # 2,000,000 bytes in make_cluster: 245 blocks, the last one short


def blocks_digest(content: bytes) -> str:
    """The ``blocks_sha256`` of a file holding ``content``."""
    return hashlib.sha256(blocks.block_digests(content, B)).hexdigest()


# -- units ------------------------------------------------------------------------------------

def test_which_files_are_stored_in_blocks():
    for path in ("base/5/16384", "base/5/16384.12", "global/1262",
                 "pg_tblspc/16400/PG_15_202209061/5/17000"):
        assert blocks.is_relation_file(path), path
        assert blocks.eligible(path, 1 << 20) and not blocks.eligible(path, (1 << 20) - 1)
    for path in ("base/5/16384_fsm", "base/5/16384_vm", "base/5/16384_init",
                 "base/5/16384_vm.1", "base/5/t3_16500", "base/5/PG_VERSION",
                 "pg_xact/0000", "base/pgsql_tmp/1", "global/pg_control", "pg_wal/0000000100"):
        assert not blocks.eligible(path, 1 << 30), path


def test_block_map_round_trip_and_damage():
    maps = [blocks.FileMap("base/5/1", 3 * B, blocks.block_digests(os.urandom(3 * B), B)),
            blocks.FileMap("base/5/2", B + 10, blocks.block_digests(os.urandom(B + 10), B)),
            blocks.FileMap("base/5/3", 0, b"")]
    data = blocks.encode_map(B, 7, maps)
    header = data.split(b"\n", 1)[0]
    assert header == (b'{"format": "walship-blockmap", "version": 1, "block_size": 8192, '
                      b'"digest": "sha256-128", "part": 7}')
    assert data.endswith(b'{"end": true, "files": 3}\n')
    assert list(blocks.decode_map(data, B)) == maps
    assert maps[1].blocks == 2 and maps[1].digest(1) == maps[1].digests[16:32]
    # every digest is SHA-256 of the block cut to 16 bytes
    block = os.urandom(B)
    assert blocks.block_digests(block * 2, B) == hashlib.sha256(block).digest()[:16] * 2
    for damaged in (data[:-1], data[:-30], data.replace(b'"files": 3', b'"files": 2'),
                    data.replace(b'"blocks": 2', b'"blocks": 3'), data + b"x",
                    b"not json\n" + data):
        with pytest.raises(IntegrityError):
            list(blocks.decode_map(damaged, B))
    with pytest.raises(IntegrityError, match="block size"):
        list(blocks.decode_map(data, 4 * B))


def test_block_members_round_trip_and_damage():
    chunk = os.urandom(128 * B)
    content = blocks.encode_blocks([256, 260, 383], 256, memoryview(chunk), B)
    assert content[:16] == struct.pack(">IIII", 3, 256, 260, 383)
    decoded = blocks.decode_blocks(content, B, 256)
    assert [(n, bytes(d)) for n, d in decoded] == [
        (256, chunk[:B]), (260, chunk[4 * B:5 * B]), (383, chunk[127 * B:])]
    # a file's last block may be short
    short = blocks.encode_blocks([0], 0, memoryview(b"x" * 100), B)
    assert [(n, bytes(d)) for n, d in blocks.decode_blocks(short, B, 0)] == [(0, b"x" * 100)]
    bad = [b"", struct.pack(">I", 0),  # no block
           struct.pack(">II", 2, 5) + bytes(B),  # numbers cut short
           struct.pack(">III", 2, 5, 4) + bytes(2 * B),  # not ascending
           struct.pack(">II", 1, 128) + bytes(B),  # outside the read starting at block 0
           struct.pack(">II", 1, 3) + bytes(B + 1),  # more data than blocks
           struct.pack(">III", 2, 3, 4) + bytes(B)]  # less
    for content in bad:
        with pytest.raises(IntegrityError):
            blocks.decode_blocks(content, B, 0)
    assert blocks.split_member(blocks.member_name("base/5/1.2", 384)) == ("base/5/1.2", 384)
    assert blocks.split_member("base/5/1") is None and blocks.split_member("a//b") is None


def test_changed_blocks_limit():
    hint = blocks.ChangedBlocks(frozenset({3, 9}), limit=20)
    assert [b for b in range(25) if hint.may_differ(b)] == [3, 9, 20, 21, 22, 23, 24]
    assert not blocks.ChangedBlocks(frozenset()).may_differ(10 ** 6)


@pytest.mark.parametrize("seed", range(12))
def test_a_sparse_read_asks_the_kernel_for_its_blocks_ahead(tmp_path, monkeypatch, seed):
    """With a change source, the blocks to read are those the old rule named (named, past the
    source's limit, past the parent's size), and every one of them was asked of the kernel
    (WILLNEED) before its read, never more than PREFETCH bytes ahead."""
    from walship.backup import parts

    rng = random.Random(seed)
    total = rng.randrange(1, 2000)
    size = total * B - rng.choice([0, 0, 100])
    hint = blocks.ChangedBlocks(frozenset(rng.sample(range(total + 50), rng.randrange(0, min(900, total + 50)))),
                                rng.choice([None, None, rng.randrange(0, total + 10)]))
    known = rng.choice([total, total + 5, rng.randrange(0, total + 1)])
    monkeypatch.setattr(parts, "PREFETCH", rng.choice([8 * B, 64 * B, 8 << 20]))
    asked: set[int] = set()
    read: set[int] = set()
    calls: list[int] = []

    def fadvise(fd, offset, length, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            assert offset % B == 0 and length % B == 0 and length > 0
            asked.update(range(offset // B, (offset + length) // B))
        calls.append(advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    plan = parts._SparsePlan(3, size, B, hint, known)
    assert calls[0] == os.POSIX_FADV_RANDOM
    per_read = blocks.CHUNK // B
    for first in range(0, total, per_read):
        count = min(per_read, total - first)
        wanted = plan.wanted(first, count)
        assert wanted == [b for b in range(first, first + count)
                          if b >= known or hint.may_differ(b)]
        whole = 2 * len(wanted) > count
        for block in (range(first, first + count) if whole else wanted):
            assert block in asked, f"block {block} read before it was asked for"
            read.add(block)
        ahead = len(asked - read) * B
        assert ahead <= max(parts.PREFETCH, 0) + per_read * B


def test_a_parent_entry_in_pieces_is_never_a_plain_reference(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 100)
    from walship.backup.parts import SourceFile

    sha = hashlib.sha256(b"x" * 100).hexdigest()
    entry = FileEntry("f", 100, 0o600, 0.0, sha, 1, "",
                      (Piece("", 1, PIECE_FILE, 90, "0" * 64), Piece("b", 1, PIECE_BLOCKS, 9,
                                                                     "1" * 64)))
    from types import SimpleNamespace

    parent = SimpleNamespace(name="20260101T000000Z", files=(entry,), referenced_parts=(),
                             parts=(PartEntry(1, "backups/20260101T000000Z/part.00001", 1, 1,
                                              1, None),))
    store, same, _ = unchanged_files([SourceFile("f", str(tmp_path / "f"), 100)],
                                     parent)  # type: ignore[arg-type]
    assert [s.path for s in store] == ["f"] and not same


def test_small_files_are_hashed_in_batches_and_each_is_judged_on_its_own(tmp_path, monkeypatch):
    """A cluster holds thousands of small files: the hashing pool gets one task per batch of
    them, not one per file (that cost more than the hashing), and each file is still judged
    alone: unchanged, changed, resized, vanished."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from walship.backup.parts import SourceFile

    rng = random.Random(7)
    files, entries = [], []
    for n in range(300):
        data = rng.randbytes(rng.choice([0, 10, 8192, 50_000, 300_000]))
        path = tmp_path / f"f{n}"
        path.write_bytes(data)
        entries.append(FileEntry(f"f{n}", len(data), 0o600, 0.0,
                                 hashlib.sha256(data).hexdigest(), 1))
        files.append(SourceFile(f"f{n}", str(path), len(data)))
    changed = {f"f{n}" for n in rng.sample(range(300), 30)}
    for name in changed:  # same size, other content
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(bytes(b ^ 1 for b in data) if data else b"")
    (tmp_path / "f5").write_bytes(b"resized")
    (tmp_path / "f6").unlink()
    parent = SimpleNamespace(name="20260101T000000Z", files=tuple(entries), referenced_parts=(),
                             parts=(PartEntry(1, "backups/20260101T000000Z/part.00001", 1, 1,
                                              1, None),))
    tasks = []
    real = ThreadPoolExecutor.submit

    def submit(self, fn, *args, **kwargs):
        tasks.append(fn)
        return real(self, fn, *args, **kwargs)

    monkeypatch.setattr(ThreadPoolExecutor, "submit", submit)
    store, same, _ = unchanged_files(files, parent)  # type: ignore[arg-type]
    empty_changed = {e.path for e in entries if e.path in changed and e.size == 0}
    assert {s.path for s in store} == (changed - empty_changed) | {"f5", "f6"}
    assert {e.path for e in same} == {f.path for f in files} - {s.path for s in store}
    assert all(e.sha256 == hashlib.sha256((tmp_path / e.path).read_bytes()).hexdigest()
               for e in same)
    assert 0 < len(tasks) <= 300 // 16, len(tasks)


def _one_large_file_part(tmp_path):
    from walship.backup.parts import BlockContext, SourceFile

    path = tmp_path / "16396"
    path.write_bytes(os.urandom(2 << 20))
    files = [SourceFile("base/5/16396", str(path), 2 << 20)]
    return files, BlockContext(B, frozenset({"base/5/16396"}), {})


def test_a_parts_block_map_is_stored_while_the_part_upload_ends(tmp_path, monkeypatch):
    """The block map of a part is stored as soon as the part's last byte is read, while the
    part's own upload ends, not one request after it."""
    from walship.backup.push import store_part

    with temporary_archive("memory", tmp_path) as archive:
        files, context = _one_large_file_part(tmp_path)
        map_key = layout.block_map_key("20260101T000000Z", 1)
        map_started = threading.Event()
        waited: list[bool] = []
        real = archive.storage.put

        def put(key, chunks, **kwargs):
            if key == map_key:
                map_started.set()
                return real(key, chunks, **kwargs)
            read = list(chunks)  # the part's every byte read: its map may go now
            waited.append(map_started.wait(5))
            return real(key, read, **kwargs)

        monkeypatch.setattr(archive.storage, "put", put)
        stored = store_part(archive, "20260101T000000Z", 1, files, blocks=context)
        assert waited == [True] and stored.block_map is not None
        assert stored.block_map.key == map_key and archive.storage.head(map_key)


@pytest.mark.parametrize("failing", ["part", "map"])
def test_a_part_or_its_map_failing_leaves_neither(tmp_path, monkeypatch, failing):
    """Either upload failing fails the part, and neither object is left behind (the map
    went up while the part's upload ended)."""
    from walship.backup.push import store_part
    from walship.errors import Unavailable

    with temporary_archive("memory", tmp_path) as archive:
        files, context = _one_large_file_part(tmp_path)
        map_key = layout.block_map_key("20260101T000000Z", 1)
        real = archive.storage.put

        def put(key, chunks, **kwargs):
            read = list(chunks)
            if (key == map_key) == (failing == "map"):
                if failing == "part":  # its map is on its way meanwhile: let it land
                    import time
                    time.sleep(0.2)
                raise Unavailable(f"{key} failed")
            return real(key, read, **kwargs)

        monkeypatch.setattr(archive.storage, "put", put)
        with pytest.raises(Unavailable):
            store_part(archive, "20260101T000000Z", 1, files, blocks=context)
        assert list(archive.storage.list("")) == []


# -- push and restore on a fake server ----------------------------------------------------------

@pytest.fixture(params=["memory", "file-encrypted"])
def archive(request, tmp_path):
    with temporary_archive(request.param, tmp_path) as made:
        push_wal_names(made, ["000000010000000000000002"])
        yield made


@pytest.fixture
def file_archive(tmp_path):
    (tmp_path / "repo").mkdir()
    made = Archive(open_storage(f"file://{tmp_path / 'repo'}"), Codec())
    push_wal_names(made, ["000000010000000000000002"])
    return made


def rewrite_blocks(path: Path, changes: dict[int, bytes | None]) -> None:
    """Overwrite blocks of ``path`` in place (None: random content), keeping its mtime."""
    st = path.stat()
    with open(path, "r+b") as handle:
        for number, content in changes.items():
            handle.seek(number * B)
            handle.write(content if content is not None else os.urandom(B))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def entry_of(manifest: Manifest, path: str) -> FileEntry:
    return next(f for f in manifest.files if f.path == path)


def own_piece_size(manifest: Manifest, path: str) -> int:
    return sum(p.size for p in entry_of(manifest, path).pieces if p.backup == "")


def test_changed_blocks_only_are_stored_and_every_backup_restores(archive, tmp_path):
    data, ts = make_cluster(tmp_path)
    (data / "base/5/20000").write_bytes(os.urandom(3 << 20))  # 384 blocks
    source = Source(data, ts)
    states = []

    def take(kind: str, lines: list[str] | None = None):
        before = snapshot(data, ts)
        result = push(archive, source, kind, lines)
        states.append((result.manifest, before))
        return result

    full = take("full").manifest
    assert full.version == 1 and full.block_size == B
    assert {f.path for f in full.files if f.pieces} == set()
    assert len(full.block_maps) >= 1  # every backup records its maps
    rewrite_blocks(data / BIG, {3: None, 100: None})
    rewrite_blocks(data / "base/5/20000", {0: None, 383: None})
    incr1 = take("incr")
    assert incr1.deltas == 2
    incr1 = incr1.manifest
    assert incr1.version == 3
    entry = entry_of(incr1, BIG)
    assert [(p.backup, p.kind) for p in entry.pieces] == [(full.name, PIECE_FILE),
                                                          ("", PIECE_BLOCKS)]
    # (rebuilt from pieces: known by its block digests alone, what restore and verify check)
    assert entry.backup == full.name and entry.sha256 == "" and entry.blocks_sha256 == (
        blocks_digest((data / BIG).read_bytes()))
    assert own_piece_size(incr1, BIG) == 4 + 2 * 4 + 2 * B  # one member: one 1 MiB read
    assert own_piece_size(incr1, "base/5/20000") == 2 * (8 + B)  # two reads: two members
    assert incr1.stored_size < 200_000  # not the 5 MiB of the two files
    rewrite_blocks(data / BIG, {100: None, 101: None})
    incr2 = take("incr").manifest
    assert [p.backup for p in entry_of(incr2, BIG).pieces] == [full.name, incr1.name, ""]
    # unchanged since incr1: the same pieces, nothing stored anew
    assert [p.backup for p in entry_of(incr2, "base/5/20000").pieces] == [full.name,
                                                                         incr1.name]
    assert own_piece_size(incr2, "base/5/20000") == 0
    diff = take("diff").manifest  # everything changed since the full backup, in one piece
    assert [p.backup for p in entry_of(diff, BIG).pieces] == [full.name, ""]
    assert own_piece_size(diff, BIG) == 4 + 3 * 4 + 3 * B  # blocks 3, 100, 101: one member
    rewrite_blocks(data / BIG, {b: None for b in range(244)})  # all of it: a new base
    incr3 = take("incr").manifest
    assert [(p.backup, p.kind) for p in entry_of(incr3, BIG).pieces] == [("", PIECE_BLOCKS)]
    for number, (manifest, before) in enumerate(states):
        assert restored(archive, manifest.name, tmp_path, str(number)) == expected(
            manifest, before), manifest.name
        assert verify_backup(archive, manifest.name).restorable


def test_truncated_extended_vanished_and_unlogged_large_files(archive, tmp_path):
    data, ts = make_cluster(tmp_path)
    (data / "base/5/20000").write_bytes(os.urandom(3 << 20))
    (data / "base/5/20001").write_bytes(os.urandom(2 << 20))
    (data / "base/5/20002").write_bytes(os.urandom(2 << 20))
    (data / "base/5/20003").write_bytes(os.urandom(2 << 20))  # unlogged: never stored
    (data / "base/5/20003_init").write_bytes(b"")
    source = Source(data, ts)
    states = []

    def take(kind: str) -> Manifest:
        before = snapshot(data, ts)
        manifest = push(archive, source, kind).manifest
        states.append((manifest, before))
        return manifest

    full = take("full")
    assert "base/5/20003" not in {f.path for f in full.files}
    with open(data / "base/5/20000", "r+b") as handle:  # truncated (VACUUM), still large
        handle.truncate(200 * B)
    with open(data / "base/5/20001", "ab") as handle:  # extended by 3 blocks and a bit
        handle.write(os.urandom(3 * B + 100))
    os.unlink(data / "base/5/20002")  # dropped
    incr1 = take("incr")
    cut = entry_of(incr1, "base/5/20000")
    # nothing of the truncated file is stored again: its base is cut at restore
    assert cut.size == 200 * B and own_piece_size(incr1, "base/5/20000") == 0
    assert [p.backup for p in cut.pieces] == [full.name]
    grown = entry_of(incr1, "base/5/20001")
    assert own_piece_size(incr1, "base/5/20001") == 4 + 4 * 4 + 3 * B + 100
    assert "base/5/20002" not in {f.path for f in incr1.files}
    # truncated, then extended again with new content: the new blocks are stored (never
    # taken from the base, which held other content there)
    with open(data / "base/5/20000", "ab") as handle:
        handle.write(os.urandom(10 * B))
    incr2 = take("incr")
    assert own_piece_size(incr2, "base/5/20000") == 4 + 4 * 10 + 10 * B
    assert grown.size == (2 << 20) + 3 * B + 100
    diff = take("diff")  # against the full: 210 blocks, of which 10 changed
    assert own_piece_size(diff, "base/5/20000") == 4 + 4 * 10 + 10 * B
    for number, (manifest, before) in enumerate(states):
        out = restored(archive, manifest.name, tmp_path, str(number))
        assert out == expected(manifest, before), manifest.name
        assert "base/5/20003" not in out
        verify_backup(archive, manifest.name)
    assert "base/5/20002" not in restored(archive, incr2.name, tmp_path, "again")


def test_a_large_file_dropped_and_recreated_with_the_same_name(archive, tmp_path):
    """Same name, other content (a relfilenode reused): compared block by block like any
    change; the restore holds the new content only."""
    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    push(archive, source, "full")
    os.unlink(data / BIG)
    push(archive, source, "incr")
    (data / BIG).write_bytes(os.urandom(1 << 20))
    before = snapshot(data, ts)
    incr = push(archive, source, "incr").manifest
    assert not entry_of(incr, BIG).pieces and entry_of(incr, BIG).backup == ""
    assert restored(archive, incr.name, tmp_path, "x") == expected(incr, before)


@pytest.mark.parametrize("change", [{"system": "7300000000000000001"}, {"timeline": 2}])
def test_another_cluster_or_timeline_stores_large_files_whole(archive, tmp_path, change):
    import sys

    data, ts = make_cluster(tmp_path)
    push(archive, Source(data, ts), "full")
    rewrite_blocks(data / BIG, {1: None})
    other = Source(data, ts)
    for key, value in change.items():
        setattr(other, key, value)
    if "system" in change:
        control = data / "global/pg_control"
        control.write_bytes(int(change["system"]).to_bytes(8, sys.byteorder)
                            + control.read_bytes()[8:])
    result = push(archive, other, "incr")
    assert result.manifest.backup_type == "full" and result.deltas == 0
    assert not any(f.pieces or f.backup for f in result.manifest.files)


def test_the_final_digest_of_a_rebuilt_file_is_checked(archive, tmp_path):
    """Each piece may check out and the file still be wrong (here: the manifest claims
    another SHA-256 for the rebuilt file): restore and verify refuse it."""
    from walship.backup import verify as verify_module

    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    push(archive, source, "full")
    rewrite_blocks(data / BIG, {7: None})
    incr = push(archive, source, "incr").manifest
    for forged_entry, message in (
            (replace(entry_of(incr, BIG), sha256="ab" * 32), "rebuilt from its pieces"),
            # (the size is also that of the block map: it is refused before any piece)
            (replace(entry_of(incr, BIG), size=entry_of(incr, BIG).size + B),
             "block map .* does not match")):
        forged = replace(incr, files=tuple(forged_entry if f.path == BIG else f
                                           for f in incr.files))
        target = tmp_path / "restored"
        with pytest.raises(IntegrityError, match=message):
            fetch_backup(archive, incr.name, target, manifest=forged,
                         tablespace_map={16400: str(tmp_path / "t2")})
        assert not target.exists() and not (tmp_path / "t2").exists()
        real = verify_module.catalog.resolve
        verify_module.catalog.resolve = lambda *_, m=forged: m
        try:
            with pytest.raises(IntegrityError, match=message):
                verify_backup(archive, incr.name)
        finally:
            verify_module.catalog.resolve = real


def test_written_files_are_flushed_while_the_rebuilt_ones_are_checked(archive, tmp_path,
                                                                      monkeypatch):
    """The disk writes what the parts brought while the rebuilt files are read back (the
    check reads the page cache), and the last flush still comes after every check."""
    from walship.backup import fetch as fetch_module

    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    push(archive, source, "full")
    rewrite_blocks(data / BIG, {7: None})
    incr = push(archive, source, "incr").manifest
    events: list[str] = []
    flushing = threading.Event()
    real_syncfs, real_check = fetch_module._syncfs, fetch_module.check_rebuilt

    def syncfs(roots):
        events.append("flush")
        flushing.set()
        return real_syncfs(roots)

    def check(*args, **kwargs):
        assert flushing.wait(5), "the rebuilt file was checked before any flush started"
        events.append("check")
        return real_check(*args, **kwargs)

    monkeypatch.setattr(fetch_module, "_syncfs", syncfs)
    monkeypatch.setattr(fetch_module, "check_rebuilt", check)
    fetch_backup(archive, incr.name, tmp_path / "restored",
                 tablespace_map={16400: str(tmp_path / "t2")})
    assert events == ["flush", "check", "flush"]


def test_verify_checks_a_rebuilt_file_by_its_block_digests_without_rebuilding_it(
        archive, tmp_path, monkeypatch):
    """backup-verify keeps 16 bytes a block of a block-delta file (and its short blocks), not
    the file: what it computes is the digest a restore checks; damage is still found; a file
    the digests cannot decide is read again and rebuilt whole."""
    from walship.backup import verify as verify_module

    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    push(archive, source, "full")
    rewrite_blocks(data / BIG, {7: None, 200: None})
    push(archive, source, "incr")
    with open(data / BIG, "ab") as grow:  # grown: a new last block, the old short one whole
        grow.write(os.urandom(3 * B))
    rewrite_blocks(data / BIG, {7: None, 9: None})
    incr = push(archive, source, "incr").manifest
    assert entry_of(incr, BIG).blocks_sha256 and not entry_of(incr, BIG).sha256
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    largest: list[int] = []
    real_final = verify_module._BlockDigests.final_digest

    def final_digest(self, size):
        largest.append(max(p.stat().st_size for p in scratch.rglob("*") if p.is_file()))
        return real_final(self, size)

    def never(*args, **kwargs):
        raise AssertionError("a block-delta file was rebuilt")

    monkeypatch.setattr(verify_module._BlockDigests, "final_digest", final_digest)
    monkeypatch.setattr(verify_module, "write_blocks", never)
    monkeypatch.setattr(verify_module, "check_rebuilt", never)
    verify_backup(archive, incr.name, scratch=scratch)
    blocks_now = -(-(data / BIG).stat().st_size // B)
    assert largest and max(largest) <= blocks_now * blocks.DIGEST_SIZE
    assert not any(scratch.iterdir())
    # a forged digest of the rebuilt file is found
    forged_entry = replace(entry_of(incr, BIG), blocks_sha256="cd" * 32)
    forged = replace(incr, files=tuple(forged_entry if f.path == BIG else f
                                       for f in incr.files))
    real_resolve = verify_module.catalog.resolve
    monkeypatch.setattr(verify_module.catalog, "resolve", lambda *_: forged)
    with pytest.raises(IntegrityError, match="rebuilt from its pieces"):
        verify_backup(archive, incr.name, scratch=scratch)
    monkeypatch.setattr(verify_module.catalog, "resolve", real_resolve)
    # undecided by the digests: read again, the file rebuilt whole and checked
    monkeypatch.undo()
    monkeypatch.setattr(verify_module._BlockDigests, "final_digest", lambda self, size: None)
    rebuilt: list[str] = []
    real_check = verify_module.check_rebuilt
    monkeypatch.setattr(verify_module, "check_rebuilt", lambda path, entry, *a: (
        rebuilt.append(entry.path), real_check(path, entry, *a)))
    verify_backup(archive, incr.name, scratch=scratch)
    assert rebuilt == [BIG]


def test_an_older_manifest_knowing_a_rebuilt_file_by_its_sha256_still_verifies_and_restores(
        archive, tmp_path, monkeypatch):
    """Manifests written before blocks_sha256 was the one digest of a rebuilt file give its
    whole SHA-256: backup-verify rebuilds such a file in the scratch directory and checks
    that, and a restore checks it too."""
    from walship.backup import verify as verify_module

    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    push(archive, source, "full")
    rewrite_blocks(data / BIG, {7: None, 200: None})
    before = snapshot(data, ts)
    incr = push(archive, source, "incr").manifest
    old_entry = replace(entry_of(incr, BIG), sha256=before[BIG], blocks_sha256="")
    old = replace(incr, files=tuple(old_entry if f.path == BIG else f for f in incr.files))
    old.check()
    monkeypatch.setattr(verify_module.catalog, "resolve", lambda *_: old)
    rebuilt: list[str] = []
    real_check = verify_module.check_rebuilt
    monkeypatch.setattr(verify_module, "check_rebuilt", lambda path, entry, *a: (
        rebuilt.append(entry.path), real_check(path, entry, *a)))
    verify_backup(archive, incr.name)
    assert rebuilt == [BIG]
    target = tmp_path / "restored"
    fetch_backup(archive, incr.name, target, manifest=old,
                 tablespace_map={16400: str(tmp_path / "t2")})
    assert hashlib.sha256((target / BIG).read_bytes()).hexdigest() == before[BIG]


@pytest.mark.parametrize("seed", range(60))
def test_block_digests_equal_those_of_the_file_a_restore_writes(tmp_path, seed):
    """_BlockDigests against a real file written as a restore writes it (a base, pwrites of
    whole and short blocks, holes, a final cut or extension): the same digest, or None (never
    a wrong one), and None only where bytes it does not keep decide."""
    from walship.backup.unpack import check_rebuilt
    from walship.backup.verify import _BlockDigests

    rng = random.Random(seed)
    bs = 64
    path = tmp_path / "file"
    base = rng.randbytes(rng.randrange(0, 20) * bs if rng.random() < 0.7
                         else rng.randrange(0, 20 * bs))
    path.write_bytes(base)
    state = _BlockDigests(tmp_path / "digests", bs)
    cuts = sorted(rng.sample(range(len(base) + 1), min(len(base) + 1, rng.randrange(4))))
    for a, b in zip([0, *cuts], [*cuts, len(base)], strict=True):
        state.base(memoryview(base[a:b]))
    state.end_base()
    aligned = len(base) % bs == 0
    fd = os.open(path, os.O_WRONLY)
    for _ in range(rng.randrange(12)):
        number = rng.randrange(30)
        short = rng.random() < 0.15
        data = rng.randbytes(rng.randrange(1, bs) if short else bs)
        aligned = aligned and not short
        os.pwrite(fd, data, number * bs)
        state.write(number, data)
    os.close(fd)
    size = rng.choice([len(path.read_bytes()), rng.randrange(0, 32 * bs),
                       bs * rng.randrange(0, 32), bs * rng.randrange(0, 32)])
    aligned = aligned and size % bs == 0
    found = state.final_digest(size)
    state.close()
    entry = FileEntry("f", size, 0o600, 0.0, "", 0, "", (), "")
    try:
        check_rebuilt(path, replace(entry, blocks_sha256=found or "0" * 64), bs,
                      threading.Event())
        matches = True
    except IntegrityError:
        matches = False
    if found is not None:
        assert matches, "a wrong digest"
    if aligned:
        assert found is not None, "undecided, with every write whole"


def _flip(path: Path) -> bytes:
    saved = path.read_bytes()
    raw = bytearray(saved)
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    return saved


def test_a_damaged_or_missing_object_of_a_parent_fails_the_child(file_archive, tmp_path):
    """A piece's part, a block map, of the parent (and of the full backup under it): flipped
    or deleted, the child's restore and verify fail loudly and leave nothing."""
    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    full = push(file_archive, source, "full").manifest
    rewrite_blocks(data / BIG, {3: None})
    incr1 = push(file_archive, source, "incr").manifest
    rewrite_blocks(data / BIG, {5: None})
    incr2 = push(file_archive, source, "incr").manifest
    pieces = entry_of(incr2, BIG).pieces
    assert [p.backup for p in pieces] == [full.name, incr1.name, ""]
    repo = tmp_path / "repo"
    victims = [repo / layout.part_key(incr1.name, pieces[1].part),  # the parent's piece
               repo / layout.part_key(full.name, pieces[0].part),  # the base
               repo / incr1.block_maps[0].key,  # the parent's block map
               repo / full.block_maps[0].key]
    target = tmp_path / "restored"

    def attempts():
        yield lambda: fetch_backup(file_archive, incr2.name, target,
                                   tablespace_map={16400: str(tmp_path / "t2")})
        yield lambda: verify_backup(file_archive, incr2.name)

    for victim in victims:
        saved = _flip(victim)
        for attempt in attempts():
            with pytest.raises(IntegrityError):
                attempt()
            assert not target.exists() and not (tmp_path / "t2").exists()
        victim.unlink()
        for attempt in attempts():
            with pytest.raises(IntegrityError, match="missing"):
                attempt()
            assert not target.exists()
        victim.write_bytes(saved)
    restored(file_archive, incr2.name, tmp_path, "ok")  # all put back: it restores
    # a damaged block map of the parent also stops the next backup from using it
    _flip(repo / incr2.block_maps[0].key)
    with pytest.raises(IntegrityError):
        push(file_archive, source, "incr")


# -- the change-source seam ---------------------------------------------------------------------

class FakeChanges:
    """A change source answering from a dict; records what it was asked."""

    def __init__(self, answers: dict[str, blocks.ChangedBlocks]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, path: str) -> blocks.ChangedBlocks | None:
        self.asked.append(path)
        return self.answers.get(path)


def test_a_change_source_narrows_what_is_read(archive, tmp_path, monkeypatch):
    data, ts = make_cluster(tmp_path)
    (data / "base/5/20000").write_bytes(os.urandom(3 << 20))
    source = Source(data, ts)
    push(archive, source, "full")
    rewrite_blocks(data / BIG, {3: None, 100: None})
    rewrite_blocks(data / "base/5/20000", {10: None})
    before = snapshot(data, ts)
    changes = FakeChanges({BIG: blocks.ChangedBlocks(frozenset({3, 100, 101}))})
    reads: list[tuple[str, int]] = []
    real_pread = os.pread

    def counting_pread(fd, length, offset):
        reads.append((os.readlink(f"/proc/self/fd/{fd}"), length))
        return real_pread(fd, length, offset)

    from walship.backup import parts as parts_module

    monkeypatch.setattr(parts_module.os, "pread", counting_pread)
    result = push_backup(archive, source, part_size=1 << 20, backup_type="incr",
                         changed_blocks=changes)
    monkeypatch.undo()
    incr = result.manifest
    assert sorted(changes.asked) == [BIG, "base/5/20000"]  # only files with a parent version
    # covered: only blocks 3, 100, 101 read; its SHA-256 unknown, its block digests' known
    assert sorted(n for p, n in reads if p.endswith(BIG)) == [B, B, B]
    entry = entry_of(incr, BIG)
    assert entry.sha256 == "" and len(entry.blocks_sha256) == 64
    assert own_piece_size(incr, BIG) == 4 + 4 * 2 + 2 * B  # 3 and 100 changed, 101 did not
    # not covered (None): read whole and compared
    other = entry_of(incr, "base/5/20000")
    assert other.sha256 == "" and other.blocks_sha256 == blocks_digest(
        (data / "base/5/20000").read_bytes())
    assert own_piece_size(incr, "base/5/20000") == 8 + B
    assert restored(archive, incr.name, tmp_path, "x") == expected(incr, before)
    verify_backup(archive, incr.name)
    # the next backup compares against the map this one recorded (copied digests included)
    rewrite_blocks(data / BIG, {200: None})
    before = snapshot(data, ts)
    incr2 = push(archive, source, "incr").manifest
    assert own_piece_size(incr2, BIG) == 8 + B
    assert entry_of(incr2, BIG).blocks_sha256 == blocks_digest((data / BIG).read_bytes())
    assert restored(archive, incr2.name, tmp_path, "y") == expected(incr2, before)


def test_a_change_source_limit_and_growth_are_read(archive, tmp_path):
    """Blocks at or after ``limit``, and blocks past the parent's size, are read whatever
    the source lists; a source that leaves out a changed block is believed (the seam's
    contract: it must not), which shows that only the blocks it names are compared."""
    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    push(archive, source, "full")
    rewrite_blocks(data / BIG, {2: None, 50: None, 230: None})
    with open(data / BIG, "ab") as handle:
        handle.write(os.urandom(2 * B))
    changes = FakeChanges({BIG: blocks.ChangedBlocks(frozenset({50}), limit=200)})
    result = push_backup(archive, source, part_size=1 << 20, backup_type="incr",
                         changed_blocks=changes)
    incr = result.manifest
    out = restored(archive, incr.name, tmp_path, "x")
    content = (data / BIG).read_bytes()
    restored_file = (tmp_path / "restore-x" / BIG).read_bytes()
    assert len(restored_file) == len(content) and out[BIG] != hashlib.sha256(
        content).hexdigest()
    differing = [n for n in range(len(content) // B + 1)
                 if restored_file[n * B:(n + 1) * B] != content[n * B:(n + 1) * B]]
    assert differing == [2]  # 50 (listed), 230 (past the limit), 244+ (growth): all stored
