"""Differential and incremental backups end to end, on a real PostgreSQL under pgbench: full,
incr, incr, (a restart), diff, incr; each restored to its own point (a restore point made right
after it), one to the end of WAL; data equal to the source, pg_amcheck and pg_checksums clean;
the large relation files stored as their changed blocks (block pieces used, each backup
verified with its files rebuilt); a parent's object (a block map, a part) deleted fails the
child's restore and leaves nothing startable."""

from __future__ import annotations

import signal
import time

import pytest

from tests.backup.test_backup_e2e import (
    archive_everything,
    backup_list,
    start_restored,
    summary_line,
    tablespace_table,
    walship,
)
from tests.fixtures.postgres import PGBENCH_TABLES

pytestmark = pytest.mark.e2e


@pytest.mark.pg_versions
@pytest.mark.timeout(600)
def test_full_incr_incr_diff_incr_under_pgbench(pg, file_repository):
    primary = pg.initdb("primary", env=file_repository.env)  # initdb --data-checksums
    primary.start()
    primary.pgbench_init(scale=1)
    # a larger table of which a few rows change between backups (pgbench rewrites most pages
    # of its 13 MB table in a minute: those files are often stored anew as a whole)
    primary.psql("CREATE TABLE stable AS SELECT g AS id, repeat('x', 200) AS pad "
                 "FROM generate_series(1, 100000) g")
    primary.psql("VACUUM (FREEZE) stable")  # (hint bits and freezing: not a change later)
    primary.psql("CHECKPOINT")
    stable = primary.psql("SELECT pg_relation_filepath('stable')").strip()
    tables = {**PGBENCH_TABLES, "stable": "id, pad"}
    points: list[tuple[str, str, dict[str, str]]] = []  # (backup, restore point, state)
    deltas: list[int] = []  # block_deltas of each backup-push line
    wal_read = 0  # backups whose changed blocks were read from the WAL
    for number, kind in enumerate(["full", "incr", "incr", "diff", "incr"]):
        if number:  # a few rows of "stable" change
            primary.psql(f"UPDATE stable SET pad = repeat('{number}', 200) "
                         f"WHERE id % 20000 = {number}")
        if number == 3:  # a server restarted between backups: content decides, not the restart
            primary.stop()
            primary.start()
        load = primary.pgbench(seconds=60, clients=2, background=True)
        time.sleep(1)
        try:
            push = walship(pg, primary, "backup-push", "--type", kind, "--part-size", "4")
            assert load.poll() is None, "pgbench must still be writing when the backup ends"
        finally:
            load.send_signal(signal.SIGTERM)
            load.wait(timeout=60)
        line = summary_line(push.stderr, "backup-push")
        assert f" type={kind} " in line, line
        if kind != "full":  # which blocks changed: read from the WAL (no summaries here), or
            # every file compared when there is more WAL than data (one line saying which)
            said = [x for x in push.stderr.splitlines() if "WAL read for changes" in x
                    or "WAL not read for changes" in x]
            assert len(said) == 1, push.stderr
            wal_read += "WAL read for changes" in said[0]
        deltas.append(int(line.rsplit(" block_deltas=", 1)[1].split()[0]))
        name = line.split()[2]
        point = f"after_{number}"
        state = primary.table_checksums(tables)
        primary.create_restore_point(point)
        points.append((name, point, state))
    primary.pgbench(transactions=200)
    final = primary.table_checksums(tables)
    archive_everything(primary)

    rows = {r["name"]: r for r in backup_list(pg, primary)}
    names = [name for name, _, _ in points]
    assert [rows[n]["type"] for n in names] == ["full", "incr", "incr", "diff", "incr"]
    assert [rows[n]["parent"] for n in names] == [None, names[0], names[1], names[0],
                                                  names[3]]
    for name in names[1:]:
        assert rows[name]["usable"]
        assert rows[name]["stored_bytes"] < rows[name]["logical_bytes"] / 2, rows[name]
    # pgbench_accounts (13 MB at scale 1) and its index: stored as their changed blocks
    assert deltas[0] == 0 and all(n > 0 for n in deltas[1:]), deltas
    assert wal_read >= 2, wal_read  # the incrs' WAL (a backup's duration of it) is read
    storage = file_repository.open()
    try:
        from walship.archive import Archive
        from walship.backup import catalog
        from walship.codec import Codec

        manifests = [catalog.load_manifest(Archive(storage, Codec()), n) for n in names]
    finally:
        storage.close()
    assert manifests[0].block_maps
    for manifest in manifests[1:]:
        assert manifest.version == 3 and manifest.block_maps
        entry = next(f for f in manifest.files if f.path == stable)  # 24 MB, 5 rows changed
        own = [p for p in entry.pieces[1:] if p.backup == ""]
        assert entry.pieces[0].backup == names[0] and own, (manifest.name, entry)
        assert own[0].size < 256 << 10, (manifest.name, entry)
    for name in names:
        walship(pg, primary, "backup-verify", name)  # (exit status 0, or it raises)

    def check(copy) -> None:
        copy.psql("CREATE EXTENSION IF NOT EXISTS amcheck")
        pg.run_client([str(pg.bindir / "pg_amcheck"), "-h", str(copy.sockdir), "-U",
                       "postgres", "-d", "postgres", "--heapallindexed"],
                      describe="pg_amcheck", log=copy.log)
        copy.stop()
        copy.wait_stopped()
        pg.run_pg([str(pg.bindir / "pg_checksums"), "--check", "-D", str(copy.data)],
                  describe="pg_checksums --check")

    for number, (name, point, state) in enumerate(points):
        walship(pg, primary, "restore", str(pg.path / f"at{number}"), "--backup", name,
                "--target-name", point, "--target-action", "promote", "--archive-mode", "off")
        copy = start_restored(pg, primary, f"at{number}")
        assert copy.table_checksums(tables) == state, (number, name)
        check(copy)
    # an incremental backup replayed to the end of WAL (a later time than its own)
    walship(pg, primary, "restore", str(pg.path / "later"), "--backup", names[2],
            "--archive-mode", "off")
    later = start_restored(pg, primary, "later")
    assert later.table_checksums(tables) == final
    check(later)

    # The diff's block map gone: the incr on top of it fails loudly, before anything
    # startable is written (the map is what the next backup compares against).
    storage = file_repository.open()
    try:
        maps = [info.key for info in storage.list(f"backups/{names[3]}/")
                if "/blockmap." in info.key]
        assert maps
        storage.delete(maps[0])
    finally:
        storage.close()
    bad = walship(pg, primary, "restore", str(pg.path / "bad"), "--backup", names[4],
                  "--archive-mode", "off", check=False)
    assert bad.returncode == 5, bad.stderr
    assert "missing" in bad.stderr and "block map" in bad.stderr
    assert not (pg.path / "bad").exists() or not any((pg.path / "bad").iterdir())

    # One part of the full backup gone: the incremental backups that read it fail loudly,
    # before anything startable is written.
    storage = file_repository.open()
    try:
        parts = [info.key for info in storage.list(f"backups/{names[0]}/")
                 if "/part." in info.key]
        for key in parts:
            storage.delete(key)
            break
    finally:
        storage.close()
    bad = walship(pg, primary, "restore", str(pg.path / "bad"), "--backup", names[4],
                  "--archive-mode", "off", check=False)
    assert bad.returncode == 5, bad.stderr
    assert "missing" in bad.stderr
    assert not (pg.path / "bad" / "PG_VERSION").exists()
    assert not (pg.path / "bad").exists() or not any((pg.path / "bad").iterdir())


@pytest.mark.pg_versions
@pytest.mark.timeout(300)
def test_an_incr_of_a_table_in_a_tablespace(pg, file_repository):
    """A relation file in a tablespace (pg_tblspc/<oid>/PG_<major>_<catversion>/...) is
    stored as its changed blocks, found from the WAL, and rebuilt at restore into a remapped
    tablespace, data equal."""
    primary = pg.initdb("primary", env=file_repository.env)
    primary.start()
    _location, oid = tablespace_table(pg, primary)  # tt: 6 MB, block level
    primary.psql("VACUUM (FREEZE) tt")
    walship(pg, primary, "backup-push", "--type", "full")
    primary.psql("UPDATE tt SET v = 'changed' WHERE id % 3000 = 0")
    push = walship(pg, primary, "backup-push", "--type", "incr")
    assert "WAL read for changes" in push.stderr, push.stderr
    line = summary_line(push.stderr, "backup-push")
    assert " type=incr " in line and int(line.rsplit(" block_deltas=", 1)[1].split()[0]) >= 1
    name = line.split()[2]
    expected = primary.table_checksums({"tt": "id, v"})
    primary.create_restore_point("after_incr")
    archive_everything(primary)
    storage = file_repository.open()
    try:
        from walship.archive import Archive
        from walship.backup import catalog
        from walship.codec import Codec

        manifest = catalog.load_manifest(Archive(storage, Codec()), name)
    finally:
        storage.close()
    table = primary.psql("SELECT pg_relation_filepath('tt')")
    entry = next(f for f in manifest.files if f.path == table)
    assert table.startswith(f"pg_tblspc/{oid}/") and len(entry.pieces) == 2, entry
    assert entry.pieces[1].size < 256 << 10, entry  # the changed blocks only
    moved = pg.path / "ts-moved"
    walship(pg, primary, "restore", str(pg.path / "copy"), "--backup", name,
            "--tablespace-map", f"{oid}={moved}", "--target-name", "after_incr",
            "--target-action", "promote", "--archive-mode", "off")
    copy = start_restored(pg, primary, "copy")
    assert copy.table_checksums({"tt": "id, v"}) == expected
    assert copy.psql("SELECT count(*) FROM tt WHERE v = 'changed'") == "10"
