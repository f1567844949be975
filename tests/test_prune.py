"""``walship delete`` executed on the memory and file:// backends: the safe deletion order
(manifest first, then parts, then WAL lowest first), a crash after a manifest delete, dry runs,
and the command line."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta, timezone

import pytest

from tests.fixtures.archives import temporary_archive

from walship import wal
from walship.archive import Archive
from walship.backup import catalog, layout
from walship.backup.manifest import FileEntry, Manifest, PartEntry
from walship.codec import Codec
from walship.entry import main
from walship.errors import ExitStatus, NotFound
from walship.prune import execute, make_plan
from walship.retention import Policy
from walship.storage import open_storage
from walship.storage.memory import MemoryStorage

SEG = 16 << 20
NOW = datetime.now(timezone.utc).replace(microsecond=0)
DAY = timedelta(days=1)


@pytest.fixture(params=["memory", "file"])
def archive(request, tmp_path):
    with temporary_archive(request.param, tmp_path) as made:
        yield made


def set_age(archive: Archive, key: str, when: datetime) -> None:
    """Pretend ``key`` was stored at ``when``."""
    storage = archive.storage
    if isinstance(storage, MemoryStorage):
        storage.set_modified(key, when.timestamp())
    else:
        os.utime(storage.root / key, (when.timestamp(), when.timestamp()))  # type: ignore


def put(archive: Archive, key: str, when: datetime, body: bytes = b"x" * 100) -> None:
    archive.storage.put(key, [body], metadata=lambda: {})
    set_age(archive, key, when)


def fake_backup(archive: Archive, start_seg: int, start: datetime, *, stop_seg: int | None = None,
                complete: bool = True, timeline: int = 1) -> str:
    """A backup whose parts are junk (retention never reads them) and whose manifest is real."""
    name = layout.base_name(start)
    stop = start + timedelta(minutes=10)
    for number in (1, 2):
        put(archive, layout.part_key(name, number), stop)
    if complete:
        files = tuple(FileEntry(path, 1, 0o600, 0.0, "0" * 64, 1)
                      for path in ("PG_VERSION", "backup_label", "global/pg_control"))
        parts = tuple(PartEntry(n, layout.part_key(name, n), 100, 100, 3 if n == 1 else 0)
                      for n in (1, 2))
        stop_seg = start_seg if stop_seg is None else stop_seg
        manifest = Manifest(
            name=name, label=name, pg_version=150004, system_identifier="1",
            timeline=timeline, start_lsn=wal.Lsn(start_seg * SEG + 40),
            stop_lsn=wal.Lsn(stop_seg * SEG + 100),
            start_wal=wal.segment_name(timeline, start_seg, SEG),
            stop_wal=wal.segment_name(timeline, stop_seg, SEG), wal_segment_size=SEG,
            start_time=start, stop_time=stop, from_standby=False, data_directory="/d",
            files=files, parts=parts)
        catalog.store_manifest(archive, manifest)
        set_age(archive, layout.manifest_key(name), stop)
    return name


def populate(archive: Archive) -> list[str]:
    """Four daily backups starting at segments 10, 20, 30, 40; WAL 5..45 on timeline 1, a
    timeline 2 history and a stray old segment of it."""
    names = [fake_backup(archive, seg, NOW - (4 - i) * DAY)
             for i, seg in enumerate((10, 20, 30, 40))]
    for n in range(5, 46):
        put(archive, f"wal/{wal.segment_name(1, n, SEG)}", NOW - 5 * DAY + n * DAY / 10)
    put(archive, "wal/00000002.history", NOW - 5 * DAY)
    put(archive, f"wal/{wal.segment_name(2, 12, SEG)}", NOW - 5 * DAY)
    put(archive, f"wal/{wal.segment_name(1, 25, SEG)}.00000028.backup", NOW - 3 * DAY)
    return names


class Recorder:
    """A storage wrapper that records deletes and can die after a number of them."""

    def __init__(self, inner, die_after: int | None = None) -> None:
        self._inner = inner
        self.deleted: list[str] = []
        self.die_after = die_after

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def delete(self, key: str) -> None:
        if self.die_after is not None and len(self.deleted) >= self.die_after:
            raise KeyboardInterrupt("killed")
        self._inner.delete(key)
        self.deleted.append(key)


def test_dry_run_deletes_nothing(archive):
    populate(archive)
    before = [(i.key, i.size) for i in archive.storage.list("")]
    plan = make_plan(archive, Policy(retain_full=1), NOW)
    assert len(plan.delete_backups) == 3 and plan.delete_wal and plan.total_bytes > 0
    assert [(i.key, i.size) for i in archive.storage.list("")] == before


def test_confirmed_delete_goes_manifest_first_then_parts_then_wal(archive):
    names = populate(archive)
    plan = make_plan(archive, Policy(retain_full=2), NOW)
    assert plan.retained == tuple(names[2:]) and plan.wal_cutoff == "000000000000001E"
    recorder = Recorder(archive.storage)
    result = execute(Archive(recorder, archive.codec), plan)  # type: ignore[arg-type]
    order = recorder.deleted
    for name in names[:2]:
        mine = [i for i, k in enumerate(order) if k.startswith(f"backups/{name}/")]
        assert order[mine[0]] == layout.manifest_key(name) and len(mine) == 3
    last_backup = max(i for i, k in enumerate(order) if k.startswith("backups/"))
    first_wal = min(i for i, k in enumerate(order) if k.startswith("wal/"))
    assert last_backup < first_wal
    wal_gone = [k[4:] for k in order if k.startswith("wal/")]
    assert wal_gone == sorted(wal_gone, key=lambda n: (n[8:24], n))
    assert result.backups == 2 and result.wal_files == len(wal_gone)
    remaining = [i.key[4:] for i in archive.storage.list("wal/")]
    assert "00000002.history" in remaining
    assert min(n[8:24] for n in remaining if not n.endswith(".history")) == "000000000000001E"
    assert wal.segment_name(2, 12, SEG) not in remaining  # any timeline below the cutoff
    assert [e.name for e in catalog.list_backups(archive)] == names[2:]
    index = catalog.WalIndex(archive)
    assert all(not index.missing(e.manifest) for e in catalog.list_backups(archive)
               if e.manifest)


def test_a_crash_after_the_manifest_delete_leaves_an_incomplete_backup(archive):
    names = populate(archive)
    plan = make_plan(archive, Policy(retain_full=3), NOW)
    assert [b.name for b in plan.delete_backups] == [names[0]]
    recorder = Recorder(archive.storage, die_after=1)
    with pytest.raises(KeyboardInterrupt):
        execute(Archive(recorder, archive.codec), plan)  # type: ignore[arg-type]
    assert recorder.deleted == [layout.manifest_key(names[0])]
    entries = {e.name: e for e in catalog.list_backups(archive)}
    assert not entries[names[0]].complete  # listed INCOMPLETE, never offered for restore
    with pytest.raises(NotFound, match="incomplete"):
        catalog.resolve(archive, names[0])
    assert len(list(archive.storage.list("wal/"))) == 44  # no WAL went yet
    # The next run finishes the job: the leftover is stale and older than every retained one.
    again = make_plan(archive, Policy(retain_full=3), NOW)
    assert [(b.name, b.complete) for b in again.delete_backups] == [(names[0], False)]
    execute(archive, again)
    assert [e.name for e in catalog.list_backups(archive)] == names[1:]


def test_a_backup_in_progress_is_untouched_and_keeps_its_wal(archive):
    names = populate(archive)
    # A push that started 3.5 days ago and still writes parts (it started before names[1]...).
    running = layout.base_name(NOW - 3.5 * DAY)
    put(archive, layout.part_key(running, 1), NOW - timedelta(minutes=5))
    plan = make_plan(archive, Policy(retain_full=1), NOW)
    assert plan.in_progress == (running,)
    assert running not in {b.name for b in plan.delete_backups}
    since = (NOW - 3.5 * DAY - timedelta(hours=1)).timestamp()
    assert all(i.modified is not None and i.modified < since for i in plan.delete_wal)
    execute(archive, plan)
    assert running in [e.name for e in catalog.list_backups(archive)]
    assert names[-1] in [e.name for e in catalog.list_backups(archive)]


def test_nothing_goes_without_a_complete_backup(archive):
    fake_backup(archive, 10, NOW - 3 * DAY, complete=False)
    set_age(archive, layout.part_key(layout.base_name(NOW - 3 * DAY), 1), NOW - 3 * DAY)
    set_age(archive, layout.part_key(layout.base_name(NOW - 3 * DAY), 2), NOW - 3 * DAY)
    for n in range(5, 15):
        put(archive, f"wal/{wal.segment_name(1, n, SEG)}", NOW - 4 * DAY)
    plan = make_plan(archive, Policy(retain_full=1, retain_days=0), NOW)
    assert not plan.delete_backups and not plan.delete_wal and plan.notes


# -- the command line ---------------------------------------------------------------------------
@pytest.fixture
def repo(file_repo_env):
    root = file_repo_env
    return Archive(open_storage(f"file://{root}"), Codec())


def test_cli_refuses_without_a_rule(repo, capsys):
    populate(repo)
    assert main(["delete"]) == ExitStatus.USAGE
    assert main(["delete", "--confirm"]) == ExitStatus.USAGE
    assert "no retention rule" in capsys.readouterr().err
    assert len(catalog.list_backups(repo)) == 4


def test_cli_dry_run_then_confirm(repo, capsys):
    names = populate(repo)
    before = len(list(repo.storage.list("")))
    assert main(["delete", "--retain-days", "1.5"]) == 0
    out = capsys.readouterr().out
    assert f"delete  backup {names[0]} (complete)" in out and "would delete 2 backups" in out
    assert f"keep    backup {names[2]}: newest stopping before the window" in out
    assert len(list(repo.storage.list(""))) == before
    assert main(["delete", "--retain-days", "1.5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dry_run"] and [b["name"] for b in doc["delete_backups"]] == names[:2]
    assert doc["wal_cutoff"] == "000000000000001E"
    assert main(["delete", "--before", names[2], "--confirm"]) == 0
    err = capsys.readouterr().err
    assert f"delete backup {names[0]} (complete) deleted" in err and "delete done" in err
    assert [e.name for e in catalog.list_backups(repo)] == names[2:]
    assert main(["delete", "--before", "20000101T000000Z"]) == ExitStatus.USAGE
    assert main(["delete", "--before", "2026-01-01 00:00:00"]) == ExitStatus.USAGE  # no zone
    assert main(["delete", "--retain-full", "0"]) == ExitStatus.USAGE
    ts = (NOW - 10 * DAY).isoformat()
    assert main(["delete", "--before", ts, "--confirm"]) == 0
    assert [e.name for e in catalog.list_backups(repo)] == names[2:]


def test_cli_refuses_a_before_time_in_the_future(repo, capsys):
    """A typo in the year (2062 for 2026) would keep "every point from then on" restorable,
    which is none: everything but the newest backup would go. Refused, nothing deleted."""
    populate(repo)
    before = len(list(repo.storage.list("")))
    assert main(["delete", "--before", "2999-01-01 00:00+00", "--confirm"]) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert "is in the future" in err and err.count("\n") == 1
    assert len(list(repo.storage.list(""))) == before


def test_modified_times_are_recent_on_a_real_put(archive):
    archive.storage.put("wal/000000010000000000000001", [b"x"], metadata=lambda: {})
    [info] = archive.storage.list("wal/")
    assert info.modified is not None and abs(info.modified - time.time()) < 5
