"""WAL-summary change detection (walship.backup.walsummary) against a fake psycopg connection:
every reason to answer None (and its one log line), the coverage of the LSN range by the
summaries, a timeline switch followed through the history, truncation limits, the mapping of
relation blocks to segment files and tablespace paths, and the bounded wait with a fake clock.
The real SQL runs against PostgreSQL 18 in test_walsummary_e2e.py."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import pytest

from walship import wal
from walship.backup import walsummary as ws
from walship.backup.walsummary import (
    BlockChanges,
    FileChanges,
    NoChangeSource,
    RelationFile,
    changed_blocks,
    parse_relation_path,
    read_block_changes,
    select_summaries,
    timeline_pieces,
)

L = wal.Lsn.parse
SYSTEM = "7401234567890123456"
CATALOG = 202506291
VDIR = f"PG_18_{CATALOG}"
SEG = 131072  # blocks per segment file with 8 kB blocks (1 GiB)
DB = 5
SPC = ws.DEFAULT_TABLESPACE


# -- the fake server ---------------------------------------------------------------------------
@dataclass
class FakeServer:
    """What the fake connection answers. ``summaries``: (tli, start, end) -> rows of
    pg_wal_summary_contents; ``states``: successive pg_get_wal_summarizer_state rows (the last
    one repeats); ``fail``: a query fragment -> the psycopg error it raises."""

    version: int = 180001
    summarize_wal: str = "on"
    system: str = SYSTEM
    block_size: int = 8192
    segment_setting: tuple[str, str] = ("131072", "8kB")
    summaries: dict[tuple[int, str, str], list[tuple]] = field(default_factory=dict)
    states: list[tuple] = field(default_factory=lambda: [(1, "1/0", "1/0", 123)])
    files: dict[str, str] = field(default_factory=dict)  # pg_read_file
    fail: dict[str, Exception] = field(default_factory=dict)
    queries: list[str] = field(default_factory=list)
    read: list[tuple[int, str, str]] = field(default_factory=list)  # summaries whose contents
    in_transaction: int = 0
    shuffle: bool = True


class FakeCursor:
    def __init__(self, conn: FakeConnection, name: str | None) -> None:
        self.conn, self.name, self.rows, self.at = conn, name, [], 0

    def __enter__(self) -> FakeCursor:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def execute(self, sql: str, params: tuple = ()) -> FakeCursor:
        server = self.conn.server
        server.queries.append(sql)
        if self.name is not None and not server.in_transaction:
            raise psycopg.ProgrammingError("a named cursor needs a transaction")
        for fragment, error in server.fail.items():
            if fragment in sql:
                raise error
        self.rows, self.at = self._answer(sql, params), 0
        return self

    def _answer(self, sql: str, params: tuple) -> list[tuple]:
        server = self.conn.server
        if "current_setting('summarize_wal')" in sql:
            return [(server.summarize_wal,)]
        if "pg_control_system()" in sql:
            return [(server.system, CATALOG)]
        if "current_setting('block_size')" in sql:
            return [(str(server.block_size),)]
        if "name = 'segment_size'" in sql:
            return [server.segment_setting]
        if "pg_get_wal_summarizer_state()" in sql:
            state = server.states.pop(0) if len(server.states) > 1 else server.states[0]
            return [state]
        if "pg_read_file" in sql:
            name = params[0]
            if name not in server.files:
                raise psycopg.errors.UndefinedFile(f'could not open file "{name}"')
            return [(server.files[name],)]
        if "FROM pg_available_wal_summaries()" in sql:
            return sorted(server.summaries, key=lambda s: (L(s[1]), L(s[2])))
        if "pg_wal_summary_contents" in sql:
            rows: list[tuple] = []
            for key in zip(*params):
                key = (int(key[0]), str(key[1]), str(key[2]))
                if key not in server.summaries:
                    raise psycopg.errors.UndefinedFile(f"summary {key} removed")
                server.read.append(key)
                rows += server.summaries[key]
            if server.shuffle:  # from_rows must not depend on the server's order
                rows = rows + rows[:1]
                random.Random(7).shuffle(rows)
            return rows
        raise AssertionError(f"unexpected query {sql}")

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def fetchall(self):
        return list(self.rows)

    def fetchmany(self, size: int):
        batch = self.rows[self.at:self.at + size]
        self.at += len(batch)
        return batch


@dataclass
class Info:
    server_version: int


class FakeConnection:
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.info = Info(server.version)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.server.in_transaction += 1
        try:
            yield
        finally:
            self.server.in_transaction -= 1

    def cursor(self, name: str | None = None) -> FakeCursor:
        return FakeCursor(self, name)


class Clock:
    """A fake monotonic clock; sleeping advances it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


def row(block: int, rel: int = 16384, *, limit: bool = False, fork: int = 0, db: int = DB,
        spc: int = SPC) -> tuple:
    return (spc, db, rel, fork, limit, block)


def ask(server: FakeServer, since: str = "1/0", until: str = "1/100", *, clock: Clock | None = None,
        **kwargs) -> BlockChanges | NoChangeSource:
    clock = clock or Clock()
    kwargs.setdefault("timeline", 1)
    return read_block_changes(FakeConnection(server), since_lsn=L(since), until_lsn=L(until),
                              clock=clock, sleep=clock.sleep, **kwargs)


def covered(server: FakeServer, rows: list[tuple], since: str = "1/0",
            until: str = "1/100") -> BlockChanges:
    server.summaries[(1, since, until)] = rows
    server.states = [(1, until, until, 123)]
    found = ask(server, since, until)
    assert isinstance(found, BlockChanges), found
    return found


# -- reasons to say nothing ---------------------------------------------------------------------
def test_before_17_no_query_and_one_log_line():
    server = FakeServer(version=160004)
    lines: list[str] = []
    assert changed_blocks(FakeConnection(server), timeline=1, since_lsn=L("1/0"),
                          until_lsn=L("1/100"), log=lines.append) is None
    assert server.queries == []
    assert len(lines) == 1 and "PostgreSQL 16 has no WAL summaries" in lines[0], lines
    assert "reading and comparing" in lines[0]


def test_summarize_wal_off():
    found = ask(FakeServer(summarize_wal="off"))
    assert isinstance(found, NoChangeSource) and "summarize_wal is off" in found.reason


def test_another_system():
    found = ask(FakeServer(), system_identifier="7000000000000000001")
    assert isinstance(found, NoChangeSource) and "another system" in found.reason
    assert "7000000000000000001" in found.reason and SYSTEM in found.reason


def test_the_same_system_passes():
    server = FakeServer()
    assert isinstance(covered(server, []), BlockChanges)
    server2 = FakeServer()
    server2.summaries[(1, "1/0", "1/100")] = []
    server2.states = [(1, "1/100", "1/100", 1)]
    assert isinstance(ask(server2, system_identifier=SYSTEM), BlockChanges)


def test_permission_denied_names_what_is_needed():
    server = FakeServer(fail={"pg_available_wal_summaries": psycopg.errors.InsufficientPrivilege(
        "permission denied for function pg_available_wal_summaries")})
    server.states = [(1, "1/100", "1/100", 1)]
    lines: list[str] = []
    assert changed_blocks(FakeConnection(server), timeline=1, since_lsn=L("1/0"),
                          until_lsn=L("1/100"), log=lines.append) is None
    assert len(lines) == 1 and "permission denied" in lines[0], lines
    assert "EXECUTE on pg_get_wal_summarizer_state" in lines[0]


def test_a_summary_removed_while_read_gives_none_not_part():
    server = FakeServer()
    server.summaries[(1, "1/0", "1/80")] = [row(1)]
    server.summaries[(1, "1/80", "1/100")] = [row(2)]
    server.states = [(1, "1/100", "1/100", 1)]
    server.fail["pg_wal_summary_contents"] = psycopg.errors.UndefinedFile(
        'could not open file "pg_wal/summaries/...summary"')
    found = ask(server)
    assert isinstance(found, NoChangeSource) and "could not open file" in found.reason
    assert server.in_transaction == 0  # the transaction (or savepoint) was left


def test_an_answer_that_does_not_parse_gives_none():
    server = FakeServer()
    server.states = [(1, "not an lsn", "1/100", 1)]
    found = ask(server)
    assert isinstance(found, NoChangeSource) and "not understood" in found.reason


def test_range_backwards():
    found = ask(FakeServer(), since="1/100", until="1/0")
    assert isinstance(found, NoChangeSource) and "backwards" in found.reason


def test_empty_range_needs_no_summary_and_no_wait():
    server = FakeServer(states=[(1, "0/10", "0/10", None)])  # summarizer far behind
    found = ask(server, since="1/100", until="1/100")
    assert isinstance(found, BlockChanges) and found.summaries == 0
    assert not any("pg_get_wal_summarizer_state" in q for q in server.queries)
    assert found.file_changes(f"base/{DB}/16384", 8192 * 3) == FileChanges(
        f"base/{DB}/16384", ())


def test_changed_blocks_logs_nothing_when_it_answers():
    server = FakeServer()
    server.summaries[(1, "1/0", "1/100")] = [row(3)]
    server.states = [(1, "1/100", "1/100", 1)]
    lines: list[str] = []
    found = changed_blocks(FakeConnection(server), timeline=1, since_lsn=L("1/0"),
                           until_lsn=L("1/100"), log=lines.append)
    assert isinstance(found, BlockChanges) and lines == []
    assert found.file_changes(f"base/{DB}/16384", 8192 * 4).blocks == (3,)


# -- the bounded wait ---------------------------------------------------------------------------
def test_waits_for_the_summarizer_to_reach_until():
    server = FakeServer()
    server.summaries[(1, "1/0", "1/100")] = [row(7)]
    server.states = [(1, "1/0", "1/40", 1), (1, "1/0", "1/80", 1), (1, "1/100", "1/100", 1)]
    clock = Clock()
    found = ask(server, clock=clock)
    assert isinstance(found, BlockChanges) and clock.sleeps == 2
    assert found.file_changes(f"base/{DB}/16384", 8192 * 8).blocks == (7,)


def test_gives_up_after_wait_seconds_without_progress():
    server = FakeServer(states=[(1, "1/0", "1/40", None)])
    clock = Clock()
    found = ask(server, clock=clock, wait=5.0, max_wait=300.0)
    assert isinstance(found, NoChangeSource)
    assert "not running" in found.reason and "no progress for 5.0 s" in found.reason
    assert 5.0 <= clock.now - 1000.0 < 5.2
    assert not any("pg_wal_summary_contents" in q for q in server.queries)


def test_progress_restarts_the_wait_but_max_wait_bounds_it():
    class Moving(list):  # the summarizer reads on and on, never reaching 2/0
        n = 0

        def pop(self, index=-1):
            self.n += 1
            return (1, "1/0", f"1/{self.n:X}", 42)

        def __len__(self):
            return 2

    server = FakeServer()
    server.states = Moving()
    clock = Clock()
    found = ask(server, until="2/0", clock=clock, wait=1.0, max_wait=30.0)
    assert isinstance(found, NoChangeSource) and "still behind after 30" in found.reason
    assert 30.0 <= clock.now - 1000.0 < 30.2  # far past `wait`: progress kept it waiting


def test_summarized_lsn_moving_counts_as_progress():
    class Summarizing(list):  # pending stands still, summarized moves (a summary written)
        n = 0

        def pop(self, index=-1):
            self.n += 1
            return (1, f"1/{self.n:X}", "1/FF", 42) if self.n < 40 else (1, "2/0", "2/0", 42)

        def __len__(self):
            return 2

    server = FakeServer()
    server.states = Summarizing()
    server.summaries[(1, "1/0", "2/0")] = []
    clock = Clock()
    found = ask(server, until="2/0", clock=clock, wait=1.0, max_wait=300.0)
    assert isinstance(found, BlockChanges), found


def test_changed_blocks_passes_wait_and_max_wait(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(ws.time, "monotonic", clock)
    monkeypatch.setattr(ws.time, "sleep", clock.sleep)
    server = FakeServer(states=[(1, "1/0", "1/40", 9)])
    assert changed_blocks(FakeConnection(server), timeline=1, since_lsn=L("1/0"),
                          until_lsn=L("1/100"), wait=2.0, max_wait=60.0) is None
    assert 2.0 <= clock.now - 1000.0 < 2.2


# -- coverage of the range ----------------------------------------------------------------------
def S(tli: int, start: str, end: str) -> tuple[int, wal.Lsn, wal.Lsn]:
    return (tli, L(start), L(end))


def test_select_summaries_exact_and_overlapping_cover():
    every = [S(1, "0/80", "1/10"), S(1, "1/10", "1/50"), S(1, "1/50", "1/200"),
             S(1, "1/200", "1/300"), S(1, "0/10", "0/80")]
    assert select_summaries(every, 1, L("1/0"), L("1/100")) == [
        S(1, "0/80", "1/10"), S(1, "1/10", "1/50"), S(1, "1/50", "1/200")]


def test_select_summaries_gap_in_the_middle():
    every = [S(1, "1/0", "1/40"), S(1, "1/48", "1/100")]
    found = select_summaries(every, 1, L("1/0"), L("1/100"))
    assert isinstance(found, NoChangeSource) and "gap at 1/40" in found.reason


def test_select_summaries_gap_at_the_end():
    found = select_summaries([S(1, "1/0", "1/90")], 1, L("1/0"), L("1/100"))
    assert isinstance(found, NoChangeSource) and "gap at 1/90" in found.reason


def test_select_summaries_start_removed():
    found = select_summaries([S(1, "1/20", "1/100")], 1, L("1/0"), L("1/100"))
    assert isinstance(found, NoChangeSource) and "start at 1/20" in found.reason


def test_select_summaries_all_removed():
    found = select_summaries([S(1, "2/0", "2/10")], 1, L("1/0"), L("1/100"))
    assert isinstance(found, NoChangeSource) and "no WAL summary" in found.reason


def test_select_summaries_of_another_timeline_do_not_count():
    found = select_summaries([S(2, "1/0", "1/100")], 1, L("1/0"), L("1/100"))
    assert isinstance(found, NoChangeSource) and "timeline(s) 2, not 1" in found.reason


def test_summaries_outside_the_range_are_not_read():
    server = FakeServer()
    server.summaries[(1, "0/0", "1/0")] = [row(1)]
    server.summaries[(1, "1/0", "1/100")] = [row(2)]
    server.summaries[(1, "1/100", "1/200")] = [row(3)]
    server.states = [(1, "1/200", "1/200", 1)]
    found = ask(server)
    assert isinstance(found, BlockChanges) and found.summaries == 1
    assert server.read == [(1, "1/0", "1/100")]
    assert found.file_changes(f"base/{DB}/16384", 8192 * 4).blocks == (2,)


def test_a_gap_in_the_real_query_path_gives_none():
    server = FakeServer()
    server.summaries[(1, "1/0", "1/40")] = [row(1)]
    server.summaries[(1, "1/60", "1/100")] = [row(2)]
    server.states = [(1, "1/100", "1/100", 1)]
    found = ask(server)
    assert isinstance(found, NoChangeSource) and "gap at 1/40" in found.reason
    assert server.read == []


def test_the_contents_are_read_through_a_server_side_cursor_in_a_transaction():
    server = FakeServer()
    covered(server, [row(1)])
    assert any("pg_wal_summary_contents" in q for q in server.queries)
    # (the fake refuses a named cursor outside a transaction, as PostgreSQL does in autocommit)


# -- timelines ---------------------------------------------------------------------------------
HISTORY = [wal.HistoryEntry(1, L("1/60"), "promoted")]


def test_timeline_pieces_cut_at_the_switch():
    assert timeline_pieces(HISTORY, 2, 1, L("1/0"), L("1/100"), L("1/20")) == [
        S(1, "1/0", "1/60"), S(2, "1/60", "1/100")]


def test_timeline_pieces_parent_not_an_ancestor():
    found = timeline_pieces(HISTORY, 2, 3, L("1/0"), L("1/100"), L("1/20"))
    assert isinstance(found, NoChangeSource) and "not in the history" in found.reason


def test_timeline_pieces_parent_stopped_after_the_switch():
    found = timeline_pieces(HISTORY, 2, 1, L("1/0"), L("1/100"), L("1/61"))
    assert isinstance(found, NoChangeSource) and "after its switch point 1/60" in found.reason


def test_timeline_pieces_parent_stop_at_the_switch_is_fine():
    assert timeline_pieces(HISTORY, 2, 1, L("1/0"), L("1/100"), L("1/60")) == [
        S(1, "1/0", "1/60"), S(2, "1/60", "1/100")]


def test_timeline_pieces_parent_started_outside_its_timelines_span():
    history = [wal.HistoryEntry(1, L("1/60"), ""), wal.HistoryEntry(2, L("1/80"), "")]
    found = timeline_pieces(history, 3, 2, L("1/10"), L("1/100"), L("1/70"))
    assert isinstance(found, NoChangeSource) and "outside timeline 2's span" in found.reason


def test_timeline_pieces_two_switches():
    history = [wal.HistoryEntry(1, L("1/60"), ""), wal.HistoryEntry(2, L("1/80"), "")]
    assert timeline_pieces(history, 3, 1, L("1/0"), L("1/100"), L("1/10")) == [
        S(1, "1/0", "1/60"), S(2, "1/60", "1/80"), S(3, "1/80", "1/100")]


def test_timeline_pieces_history_of_another_timeline():
    found = timeline_pieces([wal.HistoryEntry(3, L("1/60"), "")], 2, 1, L("1/0"), L("1/100"),
                            L("1/10"))
    assert isinstance(found, NoChangeSource) and "not that of timeline 2" in found.reason


def switched_server() -> FakeServer:
    server = FakeServer()
    server.summaries[(1, "1/0", "1/60")] = [row(1)]
    server.summaries[(1, "1/60", "1/90")] = [row(66)]  # the old primary went on: not ours
    server.summaries[(2, "1/60", "1/100")] = [row(2)]
    server.states = [(2, "1/100", "1/100", 1)]
    return server


def test_a_switch_followed_with_the_history_given():
    server = switched_server()
    found = ask(server, timeline=2, parent_timeline=1, parent_stop_lsn=L("1/20"),
                history=HISTORY)
    assert isinstance(found, BlockChanges), found
    assert sorted(server.read) == [(1, "1/0", "1/60"), (2, "1/60", "1/100")]
    assert found.file_changes(f"base/{DB}/16384", 8192 * 100).blocks == (1, 2)
    assert not any("pg_read_file" in q for q in server.queries)


def test_a_switch_followed_with_the_history_read_from_the_server():
    server = switched_server()
    server.files["pg_wal/00000002.history"] = "1\t1/60\tno recovery target specified\n"
    found = ask(server, timeline=2, parent_timeline=1, parent_stop_lsn=L("1/20"))
    assert isinstance(found, BlockChanges), found
    assert found.file_changes(f"base/{DB}/16384", 8192 * 100).blocks == (1, 2)


def test_a_switch_without_the_history_file_gives_none():
    found = ask(switched_server(), timeline=2, parent_timeline=1, parent_stop_lsn=L("1/20"))
    assert isinstance(found, NoChangeSource) and "00000002.history" in found.reason


def test_a_switch_with_a_malformed_history_gives_none():
    server = switched_server()
    server.files["pg_wal/00000002.history"] = "garbage\n"
    found = ask(server, timeline=2, parent_timeline=1, parent_stop_lsn=L("1/20"))
    assert isinstance(found, NoChangeSource) and "malformed" in found.reason


def test_a_switch_without_the_parents_stop_gives_none():
    found = ask(switched_server(), timeline=2, parent_timeline=1, history=HISTORY)
    assert isinstance(found, NoChangeSource) and "stop LSN is unknown" in found.reason


def test_same_timeline_claimed_across_a_switch_gives_none():
    # the caller says the parent is on timeline 2, but it started before timeline 2 began
    found = ask(switched_server(), timeline=2)
    assert isinstance(found, NoChangeSource) and "timeline(s) 1, not 2" in found.reason


def test_a_gap_on_the_ancestor_timeline_gives_none():
    server = switched_server()
    del server.summaries[(1, "1/0", "1/60")]
    server.summaries[(1, "1/0", "1/50")] = []
    found = ask(server, timeline=2, parent_timeline=1, parent_stop_lsn=L("1/20"),
                history=HISTORY)
    assert isinstance(found, NoChangeSource) and "timeline 1" in found.reason


# -- files: paths, forks, segments, limits --------------------------------------------------
@pytest.mark.parametrize(("path", "expected"), [
    (f"base/{DB}/16384", RelationFile(SPC, DB, 16384)),
    (f"base/{DB}/16384.3", RelationFile(SPC, DB, 16384, 0, 3)),
    (f"base/{DB}/16384_vm", RelationFile(SPC, DB, 16384, ws.VM_FORK)),
    (f"base/{DB}/16384_fsm.1", RelationFile(SPC, DB, 16384, ws.FSM_FORK, 1)),
    (f"base/{DB}/16384_init", RelationFile(SPC, DB, 16384, ws.INIT_FORK)),
    ("global/1262", RelationFile(ws.GLOBAL_TABLESPACE, 0, 1262)),
    (f"pg_tblspc/16400/{VDIR}/{DB}/16385.2", RelationFile(16400, DB, 16385, 0, 2)),
    (f"pg_tblspc/16400/PG_17_202406281/{DB}/16385", None),  # another major's directory
    (f"base/{DB}/t3_16384", None),  # a temporary relation
    (f"base/{DB}/16384.0", None),
    (f"base/{DB}/PG_VERSION", None),
    (f"base/{DB}/pg_filenode.map", None),
    ("global/pg_control", None),
    ("pg_xact/0000", None),
    ("postgresql.conf", None),
    ("base/0x1/16384", None),
])
def test_parse_relation_path(path, expected):
    assert parse_relation_path(path, VDIR) == expected
    if expected is not None:
        assert expected.path(VDIR) == path


def test_tablespace_directory():
    assert ws.tablespace_directory(180001, CATALOG) == VDIR
    assert ws.tablespace_directory(170005, 202406281) == "PG_17_202406281"


def test_blocks_are_relative_to_the_segment_file():
    found = covered(FakeServer(), [row(5), row(SEG - 1), row(SEG), row(SEG + 7),
                                   row(2 * SEG + 1)])
    full = 8192 * SEG
    assert found.file_changes(f"base/{DB}/16384", full).blocks == (5, SEG - 1)
    assert found.file_changes(f"base/{DB}/16384.1", full).blocks == (0, 7)
    assert found.file_changes(f"base/{DB}/16384.2", 8192 * 2).blocks == (1,)
    assert found.file_changes(f"base/{DB}/16384.3", 8192).blocks == ()
    assert found.block_count == 5 and found.fork_count == 1


def test_segment_size_and_block_size_come_from_the_server():
    server = FakeServer(block_size=16384, segment_setting=("65536", "16kB"))
    found = covered(server, [row(65536 + 3)])
    assert found.block_size == 16384 and found.segment_size == 65536
    assert found.file_changes(f"base/{DB}/16384.1", 16384 * 10).blocks == (3,)
    assert found.file_changes(f"base/{DB}/16384", 16384 * 10).blocks == ()


def test_other_relations_and_databases_are_kept_apart():
    found = covered(FakeServer(), [row(1, 16384), row(2, 16390), row(3, 16384, db=6)])
    assert found.file_changes(f"base/{DB}/16384", 8192 * 4).blocks == (1,)
    assert found.file_changes(f"base/{DB}/16390", 8192 * 4).blocks == (2,)
    assert found.file_changes("base/6/16384", 8192 * 4).blocks == (3,)
    assert found.file_changes(f"base/{DB}/16391", 8192 * 4) == FileChanges(
        f"base/{DB}/16391", ())


def test_tablespace_and_global_files():
    found = covered(FakeServer(), [row(4, 16385, spc=16400), row(9, 1262, db=0,
                                                                     spc=ws.GLOBAL_TABLESPACE)])
    path = f"pg_tblspc/16400/{VDIR}/{DB}/16385"
    assert found.file_changes(path, 8192 * 10).blocks == (4,)
    assert found.file_changes(f"base/{DB}/16385", 8192 * 10).blocks == ()  # not the same file
    assert found.file_changes("global/1262", 8192 * 10).blocks == (9,)
    assert found.file_changes(f"pg_tblspc/16400/PG_17_1/{DB}/16385", 8192 * 10) is None


@pytest.mark.parametrize("suffix", ["_vm", "_fsm", "_init"])
def test_only_main_forks_are_covered(suffix):
    fork = {"_vm": ws.VM_FORK, "_fsm": ws.FSM_FORK, "_init": ws.INIT_FORK}[suffix]
    found = covered(FakeServer(), [row(0, fork=fork)])
    # even a fork the summaries name, or one they do not name at all, is read whole
    assert found.file_changes(f"base/{DB}/16384{suffix}", 8192) is None
    assert found.file_changes(f"base/{DB}/16999{suffix}", 8192) is None


def test_files_that_are_not_relations_are_never_covered():
    found = covered(FakeServer(), [])
    for path in ("global/pg_control", f"base/{DB}/PG_VERSION", f"base/{DB}/pg_filenode.map",
                 "pg_xact/0000", f"base/{DB}/t3_16384", "postgresql.auto.conf"):
        assert found.file_changes(path, 8192) is None, path


def test_odd_sizes_are_not_covered():
    found = covered(FakeServer(), [row(1)])
    assert found.file_changes(f"base/{DB}/16384", 8192 * 2 + 100) is None
    assert found.file_changes(f"base/{DB}/16384", 8192 * (SEG + 1)) is None
    assert found.file_changes(f"base/{DB}/16384", -8192) is None
    assert found.file_changes(f"base/{DB}/16384", 0) == FileChanges(f"base/{DB}/16384", ())


def test_blocks_beyond_the_files_size_are_not_listed():
    found = covered(FakeServer(), [row(1), row(50)])
    assert found.file_changes(f"base/{DB}/16384", 8192 * 10).blocks == (1,)


def test_a_truncation_lists_every_block_from_the_limit():
    # VACUUM cut the table to 6 blocks; it then grew back to 9 (blocks 6-8 modified after)
    found = covered(FakeServer(), [row(2), row(7), row(6, limit=True), row(8)])
    changes = found.file_changes(f"base/{DB}/16384", 8192 * 9)
    assert changes == FileChanges(f"base/{DB}/16384", (2, 6, 7, 8), 6)
    assert found.limit_block(f"base/{DB}/16384") == 6


def test_the_lowest_limit_wins():
    server = FakeServer(shuffle=False)  # the lower limit comes first: the last must not win
    server.summaries[(1, "1/0", "1/50")] = [row(3), row(5, limit=True)]
    server.summaries[(1, "1/50", "1/100")] = [row(8, limit=True), row(9)]
    server.states = [(1, "1/100", "1/100", 1)]
    found = ask(server)
    assert found.file_changes(f"base/{DB}/16384", 8192 * 10) == FileChanges(
        f"base/{DB}/16384", (3, 5, 6, 7, 8, 9), 5)


def test_a_limit_in_an_earlier_segment_makes_later_segments_new():
    found = covered(FakeServer(), [row(SEG - 10, limit=True), row(3)])
    assert found.file_changes(f"base/{DB}/16384.1", 8192 * 5) is None
    first = found.file_changes(f"base/{DB}/16384", 8192 * SEG)
    assert first.limit == SEG - 10 and first.blocks == (3, *range(SEG - 10, SEG))


def test_a_limit_in_a_later_segment_leaves_earlier_ones_alone():
    found = covered(FakeServer(), [row(SEG + 4, limit=True), row(3)])
    assert found.file_changes(f"base/{DB}/16384", 8192 * SEG) == FileChanges(
        f"base/{DB}/16384", (3,), None)
    assert found.file_changes(f"base/{DB}/16384.1", 8192 * 6) == FileChanges(
        f"base/{DB}/16384.1", (4, 5), 4)


def test_a_limit_at_a_segments_first_block_makes_it_new():
    found = covered(FakeServer(), [row(SEG, limit=True)])
    assert found.file_changes(f"base/{DB}/16384.1", 8192 * 5) is None
    assert found.file_changes(f"base/{DB}/16384", 8192 * SEG).limit is None


def test_a_relation_created_or_dropped_in_the_range_is_new():
    found = covered(FakeServer(), [row(0, 16500, limit=True), row(3, 16500)])
    assert found.file_changes(f"base/{DB}/16500", 8192 * 10) is None
    assert found.limit_block(f"base/{DB}/16500") == 0


def test_a_database_created_or_dropped_in_the_range_makes_every_file_new():
    found = covered(FakeServer(), [row(0, 0, limit=True, db=16600), row(1, 16384)])
    assert found.file_changes("base/16600/16384", 8192 * 10) is None
    assert found.file_changes("base/16600/1259", 8192 * 10) is None
    assert found.limit_block("base/16600/1259") == 0
    assert found.file_changes(f"base/{DB}/16384", 8192 * 10).blocks == (1,)
    # only that tablespace's directory of the database
    assert found.file_changes(f"pg_tblspc/16400/{VDIR}/16600/16384", 8192).blocks == ()


def test_from_rows_in_any_order_with_duplicates():
    rows = [row(b) for b in (9, 3, 3, 7, 1)] + [row(4, 16390), row(2)]
    found = BlockChanges.from_rows(rows, timeline=1, since_lsn=L("1/0"), until_lsn=L("1/1"),
                                   block_size=8192, segment_size=SEG, version_directory=VDIR)
    assert found.file_changes(f"base/{DB}/16384", 8192 * 10).blocks == (1, 2, 3, 7, 9)
    assert found.block_count == 6


@pytest.mark.parametrize("bad", [
    {"block_size": 8000}, {"block_size": 0}, {"segment_size": 0}])
def test_from_rows_refuses_bad_geometry(bad):
    args = {"timeline": 1, "since_lsn": L("1/0"), "until_lsn": L("1/1"), "block_size": 8192,
            "segment_size": SEG, "version_directory": VDIR, **bad}
    with pytest.raises(ValueError):
        BlockChanges.from_rows([], **args)


def test_from_rows_refuses_a_block_out_of_range():
    with pytest.raises(ValueError):
        BlockChanges.from_rows([row(2 ** 32 - 1)], timeline=1, since_lsn=L("1/0"),
                               until_lsn=L("1/1"), block_size=8192, segment_size=SEG,
                               version_directory=VDIR)


def test_values_are_frozen():
    found = covered(FakeServer(), [row(1)])
    changes = found.file_changes(f"base/{DB}/16384", 8192 * 2)
    with pytest.raises(AttributeError):
        changes.blocks = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        found.timeline = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        found._forks[(SPC, DB, 16384, 0)] = None  # type: ignore[index]
