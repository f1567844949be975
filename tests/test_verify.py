"""``wal-verify`` on a file:// repository: continuity along timelines, history consistency,
``--deep`` decoding, and the exit statuses."""

from __future__ import annotations

import json
import os

import pytest

from walship import wal
from walship.archive import Archive
from walship.codec import Codec
from walship.entry import main
from walship.errors import ExitStatus
from walship.storage import open_storage
from walship.verify import verify_wal

SEG = 1 << 20  # no backup manifest here: --wal-segment-size 1


@pytest.fixture
def repo(file_repo_env):
    root = file_repo_env
    return root


def push(root, tmp_path, name: str, content: bytes | None = None) -> None:
    path = tmp_path / "pg_wal" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content if content is not None else os.urandom(64) + bytes(SEG - 64))
    Archive(open_storage(f"file://{root}"), Codec()).push_wal(path)


def timeline_two(root, tmp_path) -> None:
    """Timeline 1 segments 1..5 (5 left as .partial by the promotion), timeline 2 from 5."""
    for n in range(1, 5):
        push(root, tmp_path, wal.segment_name(1, n, SEG))
    push(root, tmp_path, wal.segment_name(1, 5, SEG) + ".partial")
    push(root, tmp_path, "00000002.history", b"1\t0/580000\tno recovery target specified\n")
    for n in range(5, 9):
        push(root, tmp_path, wal.segment_name(2, n, SEG))


ERR: list[str] = []


def run(capsys, *args: str) -> tuple[int, str]:
    status = main(["wal-verify", "--wal-segment-size", "1", *args])
    captured = capsys.readouterr()
    ERR[:] = [captured.err]
    return status, captured.out


def test_a_continuous_archive_across_a_timeline_switch_is_ok(repo, tmp_path, capsys):
    timeline_two(repo, tmp_path)
    status, out = run(capsys)
    assert status == 0, out
    assert "timeline 2 (1->2): 4 segments" in out and "MISSING" not in out
    status, out = run(capsys, "--deep", "--json")
    doc = json.loads(out)
    assert status == 0 and doc["ok"] and doc["deep"] and doc["objects"] == 10
    assert doc["decoded_bytes"] == 9 * SEG + len(b"1\t0/580000\tno recovery target specified\n")


def test_a_removed_segment_is_a_gap(repo, tmp_path, capsys):
    timeline_two(repo, tmp_path)
    os.unlink(repo / "wal" / wal.segment_name(1, 3, SEG))
    os.unlink(repo / "wal" / wal.segment_name(2, 7, SEG))
    status, out = run(capsys)
    assert status == ExitStatus.INCOMPLETE == 7
    assert f"gap {wal.segment_name(1, 3, SEG)} .. {wal.segment_name(1, 3, SEG)} (1 segments)" \
        in out
    assert f"gap {wal.segment_name(2, 7, SEG)}" in out
    assert "missing segments" in ERR[0] and ERR[0].count("\n") == 1
    report = verify_wal(Archive(open_storage(f"file://{repo}"), Codec()), segment_size=SEG)
    assert [(t.timeline, t.missing) for t in report.timelines] == [(1, 1), (2, 1)]


def test_history_problems(repo, tmp_path, capsys):
    timeline_two(repo, tmp_path)
    # (wal-push refuses such a history file: stored here as an older walship could have)
    archive = Archive(open_storage(f"file://{repo}"), Codec())
    stored = archive.codec.stored_form("wal/00000003.history",
                                       [b"1\t0/580000\tx\n4\t0/800000\ty\n"])
    archive.storage.put("wal/00000003.history", stored, metadata=stored.metadata)
    push(repo, tmp_path, wal.segment_name(4, 9, SEG))  # timeline 4 without its history
    status, out = run(capsys)
    assert status == ExitStatus.INCOMPLETE
    assert "names parent 4, not an older timeline" in out
    assert "timeline 4 has segments but no 00000004.history" in out


def test_deep_finds_one_flipped_byte(repo, tmp_path, capsys):
    timeline_two(repo, tmp_path)
    victim = repo / "wal" / wal.segment_name(2, 6, SEG)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 4] ^= 0x01
    victim.write_bytes(bytes(raw))
    status, out = run(capsys)
    assert status == 0  # names alone look fine
    status, out = run(capsys, "--deep")
    assert status == ExitStatus.INTEGRITY == 5
    assert f"DAMAGED {wal.segment_name(2, 6, SEG)}" in out
    assert "damaged objects" in ERR[0] and ERR[0].count("\n") == 1


def test_deep_finds_a_short_segment(repo, tmp_path, capsys):
    push(repo, tmp_path, wal.segment_name(1, 1, SEG))
    push(repo, tmp_path, wal.segment_name(1, 2, SEG))
    status, out = run(capsys, "--wal-segment-size", "2", "--deep")  # the later flag wins
    assert status == ExitStatus.INTEGRITY and "not the segment size" in out


def test_an_empty_repository_is_ok(repo, capsys):
    status, out = run(capsys)
    assert status == 0 and "0 WAL objects" in out
