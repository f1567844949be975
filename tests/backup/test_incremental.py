"""Differential and incremental backups on a fake server (no PostgreSQL): which parent is
chosen, what is proven unchanged (size AND SHA-256, never size and time), the change-detection
corner cases, restores that rebuild each backup exactly, and chains that fail loudly."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pytest

from tests.backup.test_pipeline import FakeSource, make_cluster, push_wal_names
from tests.fixtures.archives import temporary_archive

from walship.archive import Archive
from walship.backup import blocks, catalog, layout
from walship.backup.fetch import fetch_backup
from walship.backup.manifest import Manifest
from walship.backup.push import push_backup
from walship.backup.source import ServerInfo
from walship.backup.verify import verify_backup
from walship.codec import Codec
from walship.errors import IntegrityError, NotFound
from walship.storage import open_storage


class Source(FakeSource):
    """The fake server, with a timeline (and optionally another identity)."""

    timeline = 1
    version = 150004
    system = "7301234567890123456"

    def describe(self) -> ServerInfo:
        return replace(super().describe(), version=self.version,
                       system_identifier=self.system, timeline=self.timeline)


@pytest.fixture(params=["memory", "file-encrypted"])
def archive(request, tmp_path):
    with temporary_archive(request.param, tmp_path) as made:
        push_wal_names(made, ["000000010000000000000002"])
        yield made


def snapshot(data: Path, ts: Path) -> dict[str, str]:
    """SHA-256 of every file a backup stores (what scan keeps), by manifest path."""
    out = {}
    for base, prefix in ((data, ""), (ts / "PG_15_202209061", "pg_tblspc/16400/PG_15_202209061/")):
        for path in base.rglob("*"):
            rel = prefix + path.relative_to(base).as_posix()
            if path.is_file() and not path.is_symlink():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def restored(archive: Archive, name: str, tmp_path: Path, tag: str) -> dict[str, str]:
    target = tmp_path / f"restore-{tag}"
    fetch_backup(archive, name, target, tablespace_map={16400: str(tmp_path / f"ts-{tag}")})
    out = snapshot(target, tmp_path / f"ts-{tag}")
    out.pop("tablespace_map", None)  # rewritten for the new tablespace location
    return out


def expected(manifest: Manifest, before: dict[str, str]) -> dict[str, str]:
    """What the restore must hold: the files the manifest lists, as they were on disk (the
    backup_label and tablespace_map that the stop returned: as the manifest says)."""
    return {f.path: before.get(f.path, f.sha256) for f in manifest.files
            if f.path != "tablespace_map"}


def push(archive: Archive, source: FakeSource, kind: str, lines: list[str] | None = None):
    return push_backup(archive, source, part_size=1 << 20, backup_type=kind,
                       log=(lines if lines is not None else []).append)


def test_full_incr_incr_diff_incr_each_restores_its_own_state(archive, tmp_path):
    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    states: list[tuple[Manifest, dict[str, str]]] = []

    def take(kind: str) -> Manifest:
        before = snapshot(data, ts)
        result = push(archive, source, kind)
        states.append((result.manifest, before))
        return result.manifest

    full = take("full")
    (data / "base/5/16384").write_bytes(os.urandom(2_000_000))  # changed, same size
    incr1 = take("incr")
    (data / "base/1/1259").write_bytes(os.urandom(300_000))
    incr2 = take("incr")
    (data / "base/5/16384_fsm").write_bytes(os.urandom(24576))
    diff = take("diff")
    (data / "pg_xact/0000").write_bytes(os.urandom(8192))
    incr3 = take("incr")
    assert [m.backup_type for m in (full, incr1, incr2, diff, incr3)] == [
        "full", "incr", "incr", "diff", "incr"]
    assert (incr1.parent, incr2.parent, diff.parent, incr3.parent) == (
        full.name, incr1.name, full.name, diff.name)
    # stored: only what changed (and the files every backup stores anew: label, control...)
    own = {f.path for f in incr2.files if not f.backup}
    assert "base/1/1259" in own and "base/5/16384" not in own
    assert {f.backup for f in incr2.files if f.path == "base/5/16384"} == {incr1.name}
    assert incr2.stored_size < full.stored_size / 3
    # a diff holds everything changed since the full backup
    diff_own = {f.path for f in diff.files if not f.backup}
    assert {"base/5/16384", "base/1/1259", "base/5/16384_fsm"} <= diff_own
    # references are resolved to the original holder: never to a backup that only refers
    for manifest, _ in states:
        for entry in manifest.files:
            assert entry.backup in ("", full.name, incr1.name, incr2.name, diff.name)
        for part in manifest.referenced_parts:
            holder = catalog.load_manifest(archive, part.backup)
            assert part in [replace(p, backup=holder.name) for p in holder.parts]
    for number, (manifest, before) in enumerate(states):
        assert restored(archive, manifest.name, tmp_path, str(number)) == expected(
            manifest, before)
        assert verify_backup(archive, manifest.name).restorable
    rows = {r["name"]: r for r in (catalog.summary(e, catalog.WalIndex(archive),
                                                   {m.name: m for m, _ in states})
                                   for e in catalog.list_backups(archive))}
    assert rows[incr3.name]["type"] == "incr" and rows[incr3.name]["parent"] == diff.name
    assert rows[incr3.name]["usable"] and rows[incr3.name]["logical_bytes"] == incr3.size
    assert rows[incr3.name]["stored_bytes"] == incr3.stored_size < incr3.size
    assert catalog.resolve(archive, "LATEST").name == incr3.name


def test_a_change_within_the_same_second_and_same_size_is_stored(archive, tmp_path):
    """Size and time are never trusted: content rewritten with its size and mtime kept (the
    same second as the parent's start, or a clock set back) is still seen as changed."""
    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    full = push(archive, source, "full").manifest
    victim = data / "base/5/16384"
    st = victim.stat()
    content = bytearray(victim.read_bytes())
    content[8192 * 3 + 100] ^= 0xFF  # one byte of one block
    victim.write_bytes(bytes(content))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime == st.st_mtime
    incr = push(archive, source, "incr").manifest
    entry = next(f for f in incr.files if f.path == "base/5/16384")
    # (a large relation file: the changed block is stored, in this backup, as a piece)
    assert entry.sha256 == "" and entry.blocks_sha256 == hashlib.sha256(
        blocks.block_digests(bytes(content), 8192)).hexdigest()
    assert [p.backup for p in entry.pieces] == [full.name, ""] and entry.backup == full.name
    out = restored(archive, incr.name, tmp_path, "x")
    assert out["base/5/16384"] == hashlib.sha256(content).hexdigest()


def test_truncated_extended_vanished_and_new_files(archive, tmp_path):
    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    push(archive, source, "full")
    with open(data / "base/5/16384", "r+b") as handle:  # truncated (VACUUM)
        handle.truncate(8192 * 10)
    with open(data / "base/1/1259", "ab") as handle:  # extended by one block
        handle.write(os.urandom(8192))
    os.unlink(data / "base/5/16384_fsm")  # vanished (DROP)
    (data / "base/5/16999").write_bytes(os.urandom(16384))  # new
    before = snapshot(data, ts)
    incr = push(archive, source, "incr").manifest
    own = {f.path for f in incr.files if not f.backup}
    assert {"base/5/16384", "base/1/1259", "base/5/16999"} <= own
    assert "base/5/16384_fsm" not in {f.path for f in incr.files}
    out = restored(archive, incr.name, tmp_path, "x")
    assert out == expected(incr, before)
    assert "base/5/16384_fsm" not in out


def test_unlogged_relations_stay_out_of_every_backup(archive, tmp_path):
    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    push(archive, source, "full")
    (data / "base/5/16390").write_bytes(b"v" * 8192)
    incr = push(archive, source, "incr").manifest
    paths = {f.path for f in incr.files}
    assert "base/5/16390" not in paths and "base/5/16390_init" in paths


@pytest.mark.parametrize("change,reason", [
    (dict(system="7300000000000000001"), "another cluster"),
    (dict(version=160001), "PostgreSQL 15, the server runs 16"),
    (dict(timeline=2), "timeline 1, the server is on 2"),
    (dict(timeline=0), "timeline cannot be read"),
])
def test_another_server_version_or_timeline_means_a_full_backup(archive, tmp_path, change,
                                                                  reason):
    data, ts = make_cluster(tmp_path)
    push(archive, Source(data, ts), "full")
    other = Source(data, ts)
    for key, value in change.items():
        setattr(other, key, value)
    if "system" in change:  # the data directory must be the server's
        control = data / "global/pg_control"
        raw = control.read_bytes()
        import sys
        control.write_bytes(int(change["system"]).to_bytes(8, sys.byteorder) + raw[8:])
    lines: list[str] = []
    result = push(archive, other, "incr", lines)
    assert result.manifest.backup_type == "full" and result.manifest.parent is None
    assert not result.manifest.referenced_parts and reason in result.note
    assert any("taking a full backup" in line and reason in line for line in lines)


def test_no_parent_means_a_full_backup_and_diff_takes_the_newest_full(archive, tmp_path):
    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    first = push(archive, source, "diff")
    assert first.manifest.backup_type == "full" and "no usable full backup" in first.note
    incr = push(archive, source, "incr").manifest
    diff = push(archive, source, "diff").manifest
    assert incr.parent == first.manifest.name and diff.parent == first.manifest.name


def manifests_read(monkeypatch) -> list[str]:
    """The names of the manifests read from the repository from now on, in order."""
    read: list[str] = []
    real = catalog._read_manifest

    def load(storage, codec, name):
        read.append(name)
        return real(storage, codec, name)

    monkeypatch.setattr(catalog, "_read_manifest", load)
    return read


def manifests_parsed(monkeypatch) -> list[str]:
    """The names of the manifests parsed from now on, in order."""
    parsed: list[str] = []
    real = catalog._parse_manifest

    def parse(data, name):
        parsed.append(name)
        return real(data, name)

    monkeypatch.setattr(catalog, "_parse_manifest", parse)
    return parsed


def test_the_parent_is_found_without_reading_every_older_manifest(archive, tmp_path,
                                                                    monkeypatch):
    """A month of backups is not read to find yesterday's: the newest manifests first, only
    as far back as the chosen parent's chain."""
    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    old = [push(archive, source, "full").manifest]
    old += [push(archive, source, "incr").manifest for _ in range(10)]
    full = push(archive, source, "full").manifest
    incr = push(archive, source, "incr").manifest
    read = manifests_read(monkeypatch)
    assert push(archive, source, "incr").manifest.parent == incr.name
    assert not {m.name for m in old[:4]} & set(read), read
    read.clear()
    assert push(archive, source, "diff").manifest.parent == full.name
    assert not {m.name for m in old[:4]} & set(read), read


def test_only_the_manifests_of_the_chosen_chain_are_parsed(archive, tmp_path, monkeypatch):
    """The newest manifests are read at once, but an incr's parent is the newest backup:
    the others read with it are not parsed (5 ms of CPU each for 1,000 files, which the
    backup waits for). A diff parses the newer ones it passes over (their type decides)."""
    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    older = [push(archive, source, "full").manifest, push(archive, source, "incr").manifest]
    full = push(archive, source, "full").manifest
    incr = push(archive, source, "incr").manifest
    read, parsed = manifests_read(monkeypatch), manifests_parsed(monkeypatch)
    assert catalog.newest_chain(archive) == [incr, full]
    assert sorted(parsed) == sorted([incr.name, full.name]), parsed
    assert {m.name for m in older} <= set(read), read  # (read at once, all the same)
    parsed.clear()
    assert catalog.newest_chain(archive, lambda m: m.backup_type == "full") == [full]
    assert sorted(parsed) == sorted([incr.name, full.name]), parsed
    # a manifest that fails to parse when read at once is read again (by load_manifest,
    # which turns to a mirror's copy where there is one) and the failure is not hidden
    parsed.clear()
    monkeypatch.setattr(catalog, "_parse_manifest", lambda data, name: (_ for _ in ()).throw(
        IntegrityError(f"the manifest of backup {name} is unreadable")))
    with pytest.raises(IntegrityError, match=incr.name):
        catalog.newest_chain(archive)


def test_the_chain_is_checked_again_after_the_commit_without_reading_it_again(
        archive, tmp_path, monkeypatch):
    """Once its manifest is written, backup-push checks that its chain is still whole (a
    delete may have run meanwhile) from a HEAD of each ancestor's manifest: no manifest is
    read twice (a chain of 30 took 0.3 s to read again), the repository is not listed again,
    and a parent deleted meanwhile is still reported (see
    test_a_parent_deleted_during_the_push_is_reported)."""
    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    push(archive, source, "full")
    for _ in range(4):
        push(archive, source, "incr")
    read = manifests_read(monkeypatch)
    listed: list[str] = []
    real_list = archive.storage.list

    def listing(prefix: str = "", **kwargs):
        if kwargs.get("limit") is None:
            listed.append(prefix)
        return real_list(prefix, **kwargs)

    monkeypatch.setattr(archive.storage, "list", listing)
    lines: list[str] = []
    incr = push(archive, source, "incr", lines).manifest
    assert incr.parent in read and len(read) == 5 and len(set(read)) == 5, read
    # (nor is the whole repository listed again: that grows with it, not with the chain)
    assert listed.count(layout.BACKUP_PREFIX) == 1, listed
    assert not [line for line in lines if "WARNING" in line], lines


def test_incomplete_chain_is_never_used_and_a_damaged_parent_fails_the_child(tmp_path):
    (tmp_path / "repo").mkdir()
    archive = Archive(open_storage(f"file://{tmp_path / 'repo'}"), Codec())
    push_wal_names(archive, ["000000010000000000000002"])
    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    full = push(archive, source, "full").manifest
    (data / "base/1/1259").write_bytes(os.urandom(300_000))
    incr = push(archive, source, "incr").manifest
    assert incr.referenced_parts
    part = incr.referenced_parts[0]
    victim = tmp_path / "repo" / part.key
    saved = victim.read_bytes()
    target = tmp_path / "restored"
    # a byte of the parent's part flipped: the child's restore fails, nothing is left
    raw = bytearray(saved)
    raw[len(raw) // 2] ^= 0x40
    victim.write_bytes(bytes(raw))
    for run in (lambda: fetch_backup(archive, incr.name, target,
                                     tablespace_map={16400: str(tmp_path / "t2")}),
                lambda: verify_backup(archive, incr.name)):
        with pytest.raises(IntegrityError):
            run()
        assert not target.exists() and not (tmp_path / "t2").exists()
    # the parent's part deleted: the same
    victim.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        fetch_backup(archive, incr.name, target, tablespace_map={16400: str(tmp_path / "t2")})
    assert not target.exists()
    victim.write_bytes(saved)
    restored(archive, incr.name, tmp_path, "ok")
    # the parent's manifest gone: the chain is incomplete, the child is never used
    (tmp_path / "repo" / layout.manifest_key(full.name)).unlink()
    with pytest.raises(IntegrityError, match="chain is not complete"):
        fetch_backup(archive, incr.name, target, tablespace_map={16400: str(tmp_path / "t2")})
    assert not target.exists()
    with pytest.raises(IntegrityError, match="chain is not complete"):
        verify_backup(archive, incr.name)
    with pytest.raises(NotFound):
        catalog.resolve(archive, "LATEST")
    row = catalog.summary(catalog.list_backups(archive)[-1], catalog.WalIndex(archive),
                          {incr.name: incr})
    assert row["usable"] is False and "parent" in str(row["chain_problem"])
    # status does not count it as the newest backup, and says why
    from walship.status import gather

    status = gather(archive, environ={})
    assert status.newest_backup is None
    assert [(b.name, b.backup_type) for b in status.broken_backups] == [(incr.name, "incr")]
    # and a new incr finds no usable parent: a full backup
    again = push(archive, source, "incr")
    assert again.manifest.backup_type == "full"
    status = gather(archive, environ={})
    assert status.newest_backup == again.manifest.name and status.broken_backups == ()


def test_a_manifest_naming_a_foreign_part_it_does_not_match_is_refused(archive, tmp_path):
    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    push(archive, source, "full")
    (data / "base/1/1259").write_bytes(os.urandom(300_000))
    incr = push(archive, source, "incr").manifest
    forged = replace(incr, referenced_parts=tuple(
        replace(p, digest="sha256:" + "0" * 64) for p in incr.referenced_parts))
    assert "not the one it references" in str(catalog.chain_problem(
        forged, lambda name: catalog.load_manifest(archive, name)))


def test_a_parent_deleted_during_the_push_is_reported(archive, tmp_path):
    """A delete running beside the push removes the parent: the new backup is never used, and
    backup-push says so."""
    data, ts = make_cluster(tmp_path)
    full = push(archive, Source(data, ts), "full").manifest
    source = Source(data, ts, stop_hook=lambda: archive.storage.delete(
        layout.manifest_key(full.name)))
    lines: list[str] = []
    incr = push(archive, source, "incr", lines).manifest
    assert incr.parent == full.name
    assert any("WARNING" in line and "never be used" in line for line in lines), lines
    with pytest.raises(NotFound):
        catalog.resolve(archive, "LATEST")


def test_delete_keeps_the_chain_of_every_kept_backup(archive, tmp_path):
    from datetime import timedelta

    from walship.prune import execute, make_plan
    from walship.retention import Policy

    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    full = push(archive, source, "full").manifest
    (data / "base/1/1259").write_bytes(os.urandom(300_000))
    incr = push(archive, source, "incr").manifest
    # --before the incr: the full it depends on stays
    kept = make_plan(archive, Policy(before_name=incr.name))
    assert kept.retained == (full.name, incr.name) and not kept.delete_backups
    assert any(f"{incr.name} depends on it" in r for k in kept.kept for r in k.reasons)
    full2 = push(archive, source, "full").manifest
    incr2 = push(archive, source, "incr").manifest
    assert incr2.parent == full2.name
    doomed = make_plan(archive, Policy(retain_full=1), now=incr2.stop_time + timedelta(days=1))
    assert [b.name for b in doomed.delete_backups] == [full.name, incr.name]
    assert doomed.retained == (full2.name, incr2.name)
    execute(archive, doomed)
    assert restored(archive, incr2.name, tmp_path, "after-delete")


def test_a_file_that_cannot_be_read_for_comparison_fails_the_push_cleanly(archive, tmp_path,
                                                                          monkeypatch):
    """An error while comparing files (here: one that cannot be opened) stops every other
    comparison, aborts the backup and stores nothing; the error is the real one."""
    from walship.backup import push as push_module
    from walship.errors import UsageError

    data, ts = make_cluster(tmp_path)
    source = Source(data, ts)
    push(archive, source, "full")
    before = {info.key for info in archive.storage.list("backups/")}
    real_open = os.open

    def refusing(path, *args, **kwargs):
        if str(path).endswith("base/5/16384"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(push_module.os, "open", refusing)
    with pytest.raises(UsageError, match="cannot read"):
        push(archive, source, "incr")
    monkeypatch.undo()
    assert {info.key for info in archive.storage.list("backups/")} == before
    assert source.calls[-1] == "close"
