"""The retention policy (walship.retention), property-based: random histories of backups on
branching timelines with WAL present (gaps included), full, differential and incremental
backups in chains (some broken), random policies; after applying any plan, every guarantee the
module docstring states must hold."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walship import wal
from walship.errors import UsageError
from walship.retention import CLOCK_SKEW, BackupSummary, Policy, plan, position
from walship.storage.base import ObjectInfo

SEG = 16 << 20
BASE = datetime(2026, 1, 1, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)


def at(n: float) -> datetime:
    """Segment positions double as hours: segment n was written at BASE + n hours."""
    return BASE + n * HOUR


@dataclass
class World:
    histories: dict[int, list[wal.HistoryEntry]]  # timeline -> its history (oldest first)
    begin: dict[int, int]  # timeline -> first segment number
    wal: list[ObjectInfo]
    backups: list[BackupSummary]
    now: datetime
    policy: Policy

    def timeline_for(self, segment: int, timeline: int) -> int:
        """The timeline recovery towards ``timeline`` reads segment ``segment`` from."""
        return wal.timeline_of(wal.Lsn((segment + 1) * SEG - 1), timeline,
                               self.histories[timeline])

    def on_path(self, backup: BackupSummary, timeline: int) -> bool:
        start = wal.parse_name(backup.start_wal).segment_number(SEG)  # type: ignore[arg-type]
        return wal.timeline_of(wal.Lsn(start * SEG), timeline,
                               self.histories[timeline]) == backup.timeline

    def needed(self, backup: BackupSummary, names: set[str]) -> set[str]:
        """Every segment name recovery from ``backup`` could ask for, on every timeline
        descending from it, up to that timeline's newest segment in ``names``."""
        start = wal.parse_name(backup.start_wal).segment_number(SEG)  # type: ignore[arg-type]
        need = set()
        for timeline in self.histories:
            if not self.on_path(backup, timeline):
                continue
            newest = max((wal.parse_name(n).segment_number(SEG) for n in names
                          if len(n) == 24 and int(n[:8], 16) == timeline), default=-1)
            for segment in range(start, newest + 1):
                need.add(wal.segment_name(self.timeline_for(segment, timeline), segment, SEG))
        return need


@st.composite
def worlds(draw) -> World:
    timelines = draw(st.integers(1, 4))
    histories: dict[int, list[wal.HistoryEntry]] = {1: []}
    begin = {1: draw(st.integers(0, 5))}
    end = {1: begin[1] + draw(st.integers(0, 40))}
    for tli in range(2, timelines + 1):
        parent = draw(st.integers(1, tli - 1))
        switch = draw(st.integers(begin[parent], end[parent] + 1))
        boundary = draw(st.booleans())
        lsn = wal.Lsn(switch * SEG + (0 if boundary else SEG // 2))
        histories[tli] = [*histories[parent],
                          wal.HistoryEntry(parent, lsn, "promoted")]
        begin[tli] = switch
        end[tli] = switch + draw(st.integers(0, 30))
    objects: list[ObjectInfo] = []

    def stored(name: str, n: float, size: int = 100) -> None:
        jitter = draw(st.floats(0, 0.5))
        objects.append(ObjectInfo(f"wal/{name}", size, {}, at(n + jitter).timestamp()))

    for tli in range(1, timelines + 1):
        gaps = draw(st.sets(st.integers(begin[tli], end[tli]), max_size=2))
        for n in range(begin[tli], end[tli] + 1):
            if n not in gaps:
                stored(wal.segment_name(tli, n, SEG), n + 1)
        if tli > 1:
            stored(wal.history_name(tli), begin[tli])
            parent = histories[tli][-1].parent
            switch_seg = histories[tli][-1].switchpoint.segment_number(SEG)
            if draw(st.booleans()):
                stored(wal.segment_name(parent, switch_seg, SEG) + ".partial", switch_seg)
    backups: list[BackupSummary] = []
    names: set[str] = set()
    for _ in range(draw(st.integers(0, 7))):
        tli = draw(st.integers(1, timelines))
        start = draw(st.integers(begin[tli], end[tli]))
        stop = start + draw(st.integers(0, 3))
        start_time = at(start + draw(st.floats(0, 0.9)))
        name = start_time.strftime("%Y%m%dT%H%M%SZ")
        if name in names:
            continue
        names.add(name)
        start_wal = wal.segment_name(tli, start, SEG)
        complete = draw(st.integers(0, 3)) > 0
        newest_part = start_time + timedelta(hours=draw(st.floats(0, stop - start + 1)))
        parts = tuple(ObjectInfo(f"backups/{name}/part.{i:05d}", 1000, {},
                                 newest_part.timestamp() - i)
                      for i in range(1, draw(st.integers(1, 3)) + 1))
        if complete:
            stored(f"{start_wal}.00000028.backup", stop + 1)
            kind = draw(st.sampled_from(["full", "full", "diff", "incr"]))
            older = [b for b in backups if b.complete and b.order < (start_time, (name, 1))]
            if kind == "diff":
                older = [b for b in older if b.backup_type == "full"]
            parent = draw(st.sampled_from(older)).name if older and kind != "full" else None
            if kind != "full" and draw(st.integers(0, 9)) == 0:
                parent = "20000101T000000Z"  # a parent deleted by hand: a broken chain
            chain: list[str] = []
            current = parent
            while current is not None and current not in chain:
                chain.append(current)
                current = next((b.parent for b in backups if b.name == current), None)
            references = tuple(sorted(draw(st.sets(st.sampled_from(chain)))) if chain else ())
            backups.append(BackupSummary(
                name, True, start_time,
                (*parts, ObjectInfo(f"backups/{name}/manifest", 10, {},
                                    newest_part.timestamp())),
                start_time + timedelta(hours=stop - start + 0.5), start_wal, tli,
                kind if parent else "full", parent, references))
        else:
            backups.append(BackupSummary(name, False, start_time.replace(microsecond=0),
                                         parts))
    newest = max(end.values())
    now = at(newest + draw(st.floats(0, 30)))
    complete_names = [b.name for b in backups if b.complete]
    rules = draw(st.sets(st.sampled_from(["full", "days", "name", "time"]), min_size=1))
    if not complete_names:
        rules.discard("name")
        rules.add("full")
    policy = Policy(
        retain_full=draw(st.integers(1, 4)) if "full" in rules else None,
        retain_days=draw(st.floats(0, 2.5)) if "days" in rules else None,
        before_name=draw(st.sampled_from(complete_names)) if "name" in rules else None,
        before_time=at(draw(st.floats(0, newest + 5))) if "time" in rules else None,
        incomplete_grace=timedelta(hours=draw(st.floats(0, 30))))
    return World(histories, begin, objects, backups, now, policy)


def wal_names(objects) -> set[str]:
    return {o.key[len("wal/"):] for o in objects}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_any_plan_keeps_every_promise(world: World):
    result = plan(world.backups, world.wal, world.now, world.policy)
    gone_backups = {b.name for b in result.delete_backups}
    gone_wal = {o.key for o in result.delete_wal}
    after = [o for o in world.wal if o.key not in gone_wal]
    before_names, after_names = wal_names(world.wal), wal_names(after)
    complete = sorted((b for b in world.backups if b.complete), key=lambda b: b.order)
    retained = [b for b in complete if b.name not in gone_backups]
    by_name = {b.name: b for b in world.backups}

    # Kept and deleted are a partition; the plan's "retained" are exactly the kept complete.
    assert {k.name for k in result.kept} | gone_backups == set(by_name)
    assert not {k.name for k in result.kept} & gone_backups
    assert set(result.retained) == {b.name for b in retained}

    # The newest complete backup is always kept; the N newest full backups too, with every
    # backup whose chain of parents leads to one of them.
    if complete:
        assert complete[-1] in retained
    if world.policy.retain_full:
        fulls = [b for b in complete if b.backup_type == "full"]
        kept_fulls = {b.name for b in fulls[-world.policy.retain_full:]}
        assert all(b in retained for b in fulls[-world.policy.retain_full:])
        for backup in complete:
            root, seen = backup, set()
            while root.parent is not None and root.parent in by_name \
                    and root.name not in seen:
                seen.add(root.name)
                root = by_name[root.parent]
            if root.parent is None and root.name in kept_fulls:
                assert backup in retained, (backup.name, root.name)
    else:
        assert not complete or retained

    # A kept backup keeps every backup it depends on (its whole chain): none is deleted.
    for backup in retained:
        for name in backup.depends_on:
            assert name not in gone_backups, (backup.name, name)

    # Every retained backup keeps all the WAL (that existed) it needs, on every timeline
    # descending from it, up to that timeline's newest segment.
    for backup in retained:
        assert backup.start_wal is not None
        needed = world.needed(backup, before_names) & before_names
        assert needed <= after_names, (backup.name, sorted(needed - after_names)[:3])
        assert position(backup.start_wal) >= (result.wal_cutoff or "")

    # Every point of every window has a retained backup stopping before it, if it had one.
    starts = []
    if world.policy.retain_days is not None:
        starts.append(world.now - timedelta(days=world.policy.retain_days))
    if world.policy.before_time is not None:
        starts.append(world.policy.before_time)
    for start in starts:
        # (the promise is about the points from ``start`` on: none lie before ``now`` when
        # ``start`` is later, which the command line refuses, but the planner is given)
        points = [start] + ([world.now] if world.now >= start else []) + [
            b.stop_time + timedelta(microseconds=1) for b in complete if b.stop_time >= start]
        for point in points:
            if any(b.stop_time < point for b in complete):
                assert any(b.stop_time < point for b in retained), (start, point)
        assert all(b in retained for b in complete if b.stop_time >= start)
    if world.policy.before_name is not None:
        named = by_name[world.policy.before_name]
        assert all(b in retained for b in complete if b.order >= named.order)

    # History files are never deleted; no WAL at all without a complete backup.
    assert {n for n in before_names if n.endswith(".history")} <= after_names
    if not complete:
        assert not gone_wal and not gone_backups

    # Backups in progress are untouched, and so is the WAL stored since they started.
    grace_start = (world.now - world.policy.incomplete_grace).timestamp()
    in_progress = [b for b in world.backups if not b.complete
                   and (b.newest_modified is None or b.newest_modified >= grace_start)]
    assert set(result.in_progress) == {b.name for b in in_progress}
    for backup in in_progress:
        assert backup.name not in gone_backups
        since = (backup.start_time - CLOCK_SKEW).timestamp()
        assert all(o.modified is not None and o.modified < since for o in result.delete_wal)
    # A deleted incomplete backup is stale and older than every retained backup.
    for backup in result.delete_backups:
        if not backup.complete:
            assert backup.newest_modified is not None and backup.newest_modified < grace_start
            assert retained and backup.order < retained[0].order

    # WAL goes lowest position first; bytes add up.
    positions = [position(o.key[4:]) for o in result.delete_wal]
    assert positions == sorted(positions)
    assert result.total_bytes == sum(b.stored_bytes for b in result.delete_backups) + sum(
        o.size for o in result.delete_wal)


def test_no_rule_is_a_usage_error():
    with pytest.raises(UsageError, match="no retention rule"):
        plan([], [], BASE, Policy())


def _complete(name_hour: int, start_seg: int, stop_hours: float = 0.5) -> BackupSummary:
    start = at(name_hour)
    name = start.strftime("%Y%m%dT%H%M%SZ")
    return BackupSummary(name, True, start, (ObjectInfo(f"backups/{name}/manifest", 5, {},
                                                        start.timestamp()),),
                         start + timedelta(hours=stop_hours),
                         wal.segment_name(1, start_seg, SEG), 1)


def test_a_worked_example():
    backups = [_complete(h, h) for h in (0, 10, 20, 30)]
    objects = [ObjectInfo(f"wal/{wal.segment_name(1, n, SEG)}", 7, {}, at(n + 1).timestamp())
               for n in range(0, 35)]
    objects.append(ObjectInfo("wal/00000002.history", 1, {}, at(0).timestamp()))
    objects.append(ObjectInfo("wal/000000020000000000000003", 7, {}, at(3).timestamp()))
    result = plan(backups, objects, at(35), Policy(retain_full=2))
    assert result.retained == (backups[2].name, backups[3].name)
    assert [b.name for b in result.delete_backups] == [backups[0].name, backups[1].name]
    assert result.wal_cutoff == "0000000000000014"  # segment 20
    gone = [o.key for o in result.delete_wal]
    assert gone[0] == "wal/000000010000000000000000" and len(gone) == 21  # 0..19 and TL2's 3
    assert "wal/00000002.history" not in gone
    # A window of 12 hours: backups stopping within it, plus the newest one before it.
    days = plan(backups, objects, at(35), Policy(retain_days=0.5))
    assert days.retained == (backups[2].name, backups[3].name)
    # --before NAME keeps that backup and the newer ones.
    before = plan(backups, objects, at(35), Policy(before_name=backups[1].name))
    assert before.retained == tuple(b.name for b in backups[1:])
    with pytest.raises(UsageError, match="no complete backup"):
        plan(backups, objects, at(35), Policy(before_name="20000101T000000Z"))


def test_chains_are_kept_whole():
    """full A <- incr B <- incr C; full D <- diff E <- incr F: --retain-full 1 keeps D, E, F;
    a window whose newest backup before it is C keeps C with B and A."""
    from dataclasses import replace

    made = [_complete(h, h) for h in (0, 10, 20, 30, 40, 50)]
    a, b, c, d, e, f = made
    b = replace(b, backup_type="incr", parent=a.name, references=(a.name,))
    c = replace(c, backup_type="incr", parent=b.name, references=(a.name, b.name))
    e = replace(e, backup_type="diff", parent=d.name, references=(d.name,))
    f = replace(f, backup_type="incr", parent=e.name, references=(d.name,))
    backups = [a, b, c, d, e, f]
    objects = [ObjectInfo(f"wal/{wal.segment_name(1, n, SEG)}", 7, {}, at(n + 1).timestamp())
               for n in range(0, 55)]
    full = plan(backups, objects, at(55), Policy(retain_full=1))
    assert full.retained == (d.name, e.name, f.name)
    assert [x.name for x in full.delete_backups] == [a.name, b.name, c.name]
    reasons = {k.name: k.reasons for k in full.kept}
    assert any("depends on" in r for r in reasons[e.name])
    assert reasons[d.name].count(f"{e.name} depends on it") == 1  # (parent and holder: once)
    two = plan(backups, objects, at(55), Policy(retain_full=2))
    assert two.retained == tuple(x.name for x in backups)
    # the newest backup stopping before a window starting at 25:00 is C: A and B stay with it
    window = plan(backups, objects, at(55), Policy(before_time=at(25)))
    assert window.retained == tuple(x.name for x in backups)
    window = plan(backups, objects, at(55), Policy(before_time=at(35)))
    assert window.retained == (d.name, e.name, f.name)  # D is the newest before the window
    # --before NAME of an incremental backup keeps its parents
    named = plan(backups, objects, at(55), Policy(before_name=c.name))
    assert named.retained == tuple(x.name for x in backups)
    assert named.wal_cutoff == "0000000000000000"


def test_an_incomplete_backup_in_progress_protects_recent_wal():
    old = _complete(0, 0)
    new = _complete(20, 20)
    running_start = at(5)  # started long ago, before the newest complete backup
    name = running_start.strftime("%Y%m%dT%H%M%SZ")
    running = BackupSummary(name, False, running_start, (ObjectInfo(
        f"backups/{name}/part.00001", 100, {}, at(34.5).timestamp()),))
    objects = [ObjectInfo(f"wal/{wal.segment_name(1, n, SEG)}", 7, {}, at(n + 1).timestamp())
               for n in range(0, 35)]
    result = plan([old, new, running], objects, at(35), Policy(retain_full=1))
    assert result.in_progress == (name,)
    assert [b.name for b in result.delete_backups] == [old.name]
    # Segments stored from 4:00 (5:00 minus the clock-skew margin) on are kept.
    assert [o.key[-2:] for o in result.delete_wal] == ["00", "01", "02"]
    # The same backup idle for longer than the grace period, and older than every retained
    # backup, is deleted, and the WAL protection goes with it.
    stale = plan([old, new, running], objects, at(60), Policy(retain_full=1))
    assert {b.name for b in stale.delete_backups} == {old.name, name}
    assert len(stale.delete_wal) == 20
