"""The drill itself: restore (through :func:`walship.backup.restore.restore`), start the
scratch server, wait for consistency and the end of recovery, measure RTO and RPO, validate
(SQL checks, pg_amcheck, data checksums), and stop and clean up whatever happens, on SIGTERM
too."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from walship import wal
from walship.archive import Archive
from walship.drill.plan import DrillPlan, SqlCheck
from walship.drill.report import CheckResult, DrillReport, iso_utc
from walship.drill.scratch import (
    Runner,
    Scratch,
    choose_port,
    find_bindir,
    make_scratch,
    remove_scratch,
)
from walship.drill.server import (
    Server,
    configure,
    controldata,
    last_line,
    server_environment,
    server_failure,
)
from walship.errors import DrillFailed, WalshipError


class Interrupted(BaseException):
    """SIGTERM arrived during the drill: clean up and stop."""


@dataclass(frozen=True)
class DrillOptions:
    """What the command line asks for."""

    backup: str = "LATEST"
    target: Any = None  # walship.backup.restore.RecoveryTarget (None: all archived WAL)
    scratch: str | None = None
    port: int | None = None
    keep: bool = False
    primary: str | None = None  # conninfo of the primary, for archive_timeout
    query_primary: bool = False


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the drill runs, SIGTERM (and SIGINT, SIGHUP) raise :class:`Interrupted`, so the
    cleanup runs; the caller ignores them during the cleanup itself."""
    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_drill(archive: Archive, settings: Any, plan: DrillPlan, options: DrillOptions, *,
              log: Callable[[str], None] = lambda _: None,
              clock: Callable[[], float] = time.monotonic) -> DrillReport:
    """Run a drill (see the module docstring); failures are recorded in the report, never
    raised, except bad usage, which raises before anything was done."""
    from walship.backup import catalog
    from walship.backup.restore import RecoveryTarget, choose_backup

    target = options.target or RecoveryTarget()
    runner = Runner.for_current_user()
    port = choose_port(options.port)
    # Choose the backup first: the binaries and tablespace locations depend on it.
    manifests = [e.manifest for e in catalog.list_backups(archive) if e.manifest]
    if options.backup and options.backup.upper() != catalog.LATEST:
        manifest = catalog.resolve(archive, options.backup)
    else:
        manifest = choose_backup(manifests, target)
    bindir = find_bindir(plan.pg_bindir, manifest.pg_major)
    scratch = make_scratch(options.scratch or plan.scratch, runner)
    started = datetime.now(timezone.utc)
    t0 = clock()
    report = DrillReport(started, plan, target.describe(), manifest.name, str(scratch.root),
                         port, str(bindir))
    server = Server(scratch, runner, bindir, port, server_environment(settings),
                    plan.user or runner.name)
    try:
        with _sigterm_raises():
            _newest_wal(archive, report, options, manifests, manifest.wal_segment_size)
            _restore_and_check(archive, settings, manifest, target, scratch, server, report,
                               t0, clock, log)
    except (Interrupted, KeyboardInterrupt) as signum:
        report.error = f"interrupted by {signum or 'SIGINT'}"
        raise
    except WalshipError as error:
        report.error = error.one_line()
    except Exception as error:  # psycopg or OS failures (the server died): the drill failed
        if not _environmental(error):
            raise
        from walship.redact import redact

        report.error = redact(f"{type(error).__name__}: {last_line(str(error))}", limit=500)
    finally:  # nothing left running, nor in the scratch directory (unless kept)
        with _signals_ignored():
            try:
                server.stop()
            finally:
                if options.keep:
                    log(f"drill: kept {scratch.root} (the server is stopped)")
                else:
                    remove_scratch(scratch)
        report.finished = datetime.now(timezone.utc)
    if not report.restored and report.error is None:
        report.error = "the drill did not complete"
    return report


def _environmental(error: Exception) -> bool:
    """A failure of the drill's surroundings (the server, the OS), not a bug of walship."""
    if isinstance(error, OSError):
        return True
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(error, psycopg.Error)


def _newest_wal(archive: Archive, report: DrillReport, options: DrillOptions,
                manifests: list[Any], segment_size: int) -> None:
    """The newest archived WAL and the recoverable window (one LIST of the WAL), and the
    primary's archive_timeout when asked."""
    from walship import layout
    from walship.drill.report import recoverable_window

    newest: tuple[float, str] | None = None
    objects: list[tuple[str, float | None]] = []
    for info in archive.storage.list(layout.WAL_PREFIX):
        objects.append((layout.wal_name(info.key), info.modified))
        if info.modified is not None and (newest is None or info.modified > newest[0]):
            newest = (info.modified, layout.wal_name(info.key))
    report.window = recoverable_window(manifests, objects, segment_size)
    if newest is not None:
        report.newest_wal = newest[1]
        report.newest_wal_stored = datetime.fromtimestamp(newest[0], timezone.utc)
    if not options.query_primary:
        report.archive_timeout_note = "primary not queried (give --dbname or PGHOST)"
        return
    timeout, why = read_archive_timeout(options.primary)
    report.archive_timeout = timeout
    if timeout is None:
        report.archive_timeout_note = why
    elif report.newest_wal_stored is not None:
        age = (report.started - report.newest_wal_stored).total_seconds()
        if timeout == 0:
            report.archive_timeout_note = ("archive_timeout is off: the RPO grows with "
                                           "the time a segment takes to fill")
        elif age > timeout * 2:
            report.archive_timeout_note = (f"the newest archived WAL is {age:.0f} s old, "
                                           f"over twice archive_timeout ({timeout:.0f} s): "
                                           "is archiving stuck?")
        else:
            report.archive_timeout_note = (f"the newest archived WAL is {age:.0f} s old, "
                                           f"archive_timeout is {timeout:.0f} s")


def read_archive_timeout(dbname: str | None) -> tuple[float | None, str]:
    """The primary's archive_timeout in seconds, or None and why."""
    try:
        import psycopg
    except ImportError:
        return None, "psycopg is not installed"
    from walship.pgconn import connection_args, connection_secrets
    from walship.redact import redact

    conninfo, kwargs = connection_args(dbname, "walship drill")
    kwargs["connect_timeout"] = 10
    try:
        with psycopg.connect(conninfo, **kwargs) as conn:
            row = conn.execute("SELECT setting::float FROM pg_settings "
                               "WHERE name = 'archive_timeout'").fetchone()
    except psycopg.Error as error:
        text = last_line(str(error)) or type(error).__name__
        return None, "cannot query the primary: " + redact(text,
                                                            hide=connection_secrets(dbname))
    return (float(row[0]) if row else None), ""


def _restore_and_check(archive: Archive, settings: Any, manifest: Any, target: Any,
                       scratch: Scratch, server: Server, report: DrillReport, t0: float,
                       clock: Callable[[], float], log: Callable[[str], None]) -> None:
    from walship.backup.restore import restore
    from walship.storage.mirrored import verified_read

    spaces = {t.oid: str(scratch.root / "tablespaces" / str(t.oid))
              for t in manifest.tablespaces}
    if spaces:
        os.mkdir(scratch.root / "tablespaces", 0o700)
        runner_own = server.runner.own
        runner_own(scratch.root / "tablespaces")
    try:
        # (with mirrors: a backup part that fails verification in one repository is read
        # from the next, as by walship restore; the scratch server's wal-fetch does the same)
        verified_read(archive, lambda source: restore(
            source, scratch.data, target, action="promote", backup=manifest.name,
            tablespace_map=spaces, archive_mode_off=True, parallel=settings.parallel))
    except WalshipError as error:
        raise DrillFailed("the restore failed", error.one_line()) from None
    t_fetched = clock()
    report.phases["backup_fetch"] = t_fetched - t0
    log(f"drill: backup {manifest.name} fetched into {scratch.data} "
        f"seconds={t_fetched - t0:.3f}")
    control = controldata(server.runner, server.bindir, scratch.data)
    checksums_on = control.get("Data page checksum version", "0") not in ("0", "")
    configure(scratch, server.runner, server.port, control)
    server.start()
    deadline = t0 + report.plan.timeout

    # Until consistent: the first connection (hot standby) that still is in recovery.
    conn, in_recovery = _connect(server, clock, deadline, "reach a consistent state")
    t_consistent = clock()
    try:
        while in_recovery:
            _check_alive(server, clock, deadline, "end recovery")
            time.sleep(0.1)
            try:
                in_recovery = bool(conn.execute("SELECT pg_is_in_recovery()").fetchone()[0])
            except Exception:  # noqa: BLE001 - the server may restart the connection
                conn.close()
                conn = None
                conn, in_recovery = _connect(server, clock, deadline, "end recovery")
        t_promoted = clock()
        row = conn.execute("SELECT pg_last_xact_replay_timestamp(), "
                           "pg_last_wal_replay_lsn()::text, "
                           "pg_walfile_name(pg_current_wal_lsn())").fetchone()
    finally:
        if conn is not None:
            conn.close()
    t_consistent = _consistent_from_log(server.scratch.log, report.started, t0,
                                        t_fetched, t_promoted) or t_consistent
    report.phases["wal_replay_until_consistent"] = t_consistent - t_fetched
    report.phases["until_recovery_end"] = t_promoted - t_consistent
    last_xact, replay_lsn, current_file = row
    log(f"drill: recovery ended seconds={t_promoted - t0:.3f} replayed up to {replay_lsn}")
    _rpo(report, manifest, last_xact)
    if target.kind == "latest":
        _check_reached_end(archive, scratch, manifest, current_file, report.started)

    # Validation: the first query answered ends the RTO.
    checks = list(report.plan.checks) or [SqlCheck("server answers", "SELECT 1", "postgres",
                                                   1)]
    first = True
    for check in checks:
        report.checks.append(_run_sql_check(server, check))
        if first:
            t_first = clock()
            report.phases["first_query"] = t_first - t_promoted
            report.rto_seconds = t_first - t0
            first = False
    for database in report.plan.amcheck:
        report.checks.append(_run_amcheck(server, database))
    server.stop()
    if report.plan.checksums and checksums_on:
        report.checks.append(_run_checksums(server))


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC ")


def _consistent_from_log(log: Path, started: datetime, t0: float, low: float,
                         high: float) -> float | None:
    """When the server logged "consistent recovery state reached" (on the monotonic clock of
    ``t0``), which polling cannot see when the server accepts connections only once recovery
    has ended; None if it is not in the log."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if "consistent recovery state reached" not in line:
            continue
        match = _LOG_TIME.match(line)
        if not match:
            return None
        when = datetime.fromisoformat(match[1]).replace(tzinfo=timezone.utc)
        return min(max(t0 + (when - started).total_seconds(), low), high)
    return None


def _try_connect(server: Server):
    import psycopg

    try:
        conn = server.connect(timeout=5)
    except psycopg.Error:
        return None, True
    try:
        return conn, bool(conn.execute("SELECT pg_is_in_recovery()").fetchone()[0])
    except psycopg.Error:
        conn.close()
        return None, True


def _connect(server: Server, clock: Callable[[], float], deadline: float, what: str):
    """The first connection the scratch server accepts, and whether it is in recovery; the
    drill fails once the server has stopped or the deadline passed (``what`` it was to do)."""
    while True:
        conn, in_recovery = _try_connect(server)
        if conn is not None:
            return conn, in_recovery
        _check_alive(server, clock, deadline, what)
        time.sleep(0.1)


def _check_alive(server: Server, clock: Callable[[], float], deadline: float,
                 what: str) -> None:
    if server.pid() is None:
        time.sleep(0.2)
        if server.pid() is None:
            raise DrillFailed(f"the scratch server stopped before it could {what}",
                              server_failure(server.scratch.log),
                              "see the server log (--keep keeps it)")
    if clock() > deadline:
        raise DrillFailed(f"the scratch server did not {what} within the drill's timeout",
                          server_failure(server.scratch.log), "raise drill.timeout")


def _rpo(report: DrillReport, manifest: Any, last_xact: datetime | None) -> None:
    if last_xact is not None:
        report.last_replayed_transaction = last_xact.astimezone(timezone.utc)
        report.rpo_seconds = max(0.0, (report.started - last_xact).total_seconds())
        how = (f"drill start {iso_utc(report.started)} minus the last transaction recovered, "
               f"{iso_utc(last_xact)} (pg_last_xact_replay_timestamp())")
    else:
        report.rpo_seconds = max(0.0, (report.started - manifest.stop_time).total_seconds())
        how = (f"drill start {iso_utc(report.started)} minus the backup's stop time "
               f"{iso_utc(manifest.stop_time)}: no transaction was replayed from the archive")
    if report.newest_wal_stored is not None:
        age = (report.started - report.newest_wal_stored).total_seconds()
        how += (f"; the newest archived WAL, {report.newest_wal}, was stored {age:.1f} s "
                "before the drill started")
    report.rpo_derivation = how


def _check_reached_end(archive: Archive, scratch: Scratch, manifest: Any,
                       current_file: str, started: datetime) -> None:
    """With no target, recovery must have replayed every archived segment of the timeline it
    followed: a segment archived after the point where it ended means a gap (recovery stops
    at the first missing segment and promotes, losing everything after it)."""
    from walship import layout

    new_tli = int(current_file[:8], 16)
    history_file = scratch.data / "pg_wal" / wal.history_name(new_tli)
    try:
        history = wal.parse_history(history_file.read_text())
    except (OSError, ValueError):
        return
    if not history:
        return
    parent, switchpoint = history[-1].parent, history[-1].switchpoint
    size = manifest.wal_segment_size
    end = switchpoint.segment_number(size)
    archived: dict[int, float | None] = {}
    for info in archive.storage.list(layout.wal_key(f"{parent:08X}")):
        try:
            item = wal.parse_name(layout.wal_name(info.key))
        except ValueError:
            continue
        if item.kind is wal.FileKind.SEGMENT and item.timeline == parent:
            archived[item.segment_number(size)] = info.modified
    # Only segments stored before the drill started prove a gap: the primary may archive
    # more while the drill runs, after recovery asked for them.
    before = started.timestamp()
    later = sorted(n for n, modified in archived.items()
                   if n > end and (modified is None or modified < before))
    if not later:
        return
    missing = next((n for n in range(end, later[-1]) if n not in archived), end)
    raise DrillFailed(
        f"recovery stopped at {switchpoint} on timeline {parent}, before the end of the "
        "archived WAL", f"segment {wal.segment_name(parent, missing, size)} is missing and "
        f"the archive holds {len(later)} later segments, up to "
        f"{wal.segment_name(parent, later[-1], size)}: a restore loses everything after the gap",
        "run walship wal-verify; take a new backup-push to start a continuous range")


def _run_sql_check(server: Server, check: SqlCheck) -> CheckResult:
    import psycopg

    started = time.monotonic()
    try:
        with server.connect(check.database) as conn:
            cursor = conn.execute(check.sql)
            result = cursor.pgresult
            rows = result.ntuples if result is not None else 0
            first = None
            if rows and result is not None and result.nfields:
                raw = result.get_value(0, 0)
                first = raw.decode("utf-8", "replace") if raw is not None else None
    except psycopg.Error as error:
        return CheckResult(check.name, "sql", False, time.monotonic() - started,
                           f"query failed: {last_line(str(error))[:300]}", check.database)
    seconds = time.monotonic() - started
    if check.no_rows:
        ok, detail = rows == 0, f"{rows} rows (expected none)"
    elif check.value is not None:
        ok, detail = first == check.value, f"returned {first!r} (expected {check.value!r})"
    else:
        wanted = check.min_rows if check.min_rows is not None else 1
        ok, detail = rows >= wanted, f"{rows} rows (expected at least {wanted})"
    return CheckResult(check.name, "sql", ok, seconds, detail, check.database)


def _run_amcheck(server: Server, database: str) -> CheckResult:
    started = time.monotonic()
    program = server.bindir / "pg_amcheck"
    if not program.is_file():
        return CheckResult(f"pg_amcheck {database}", "amcheck", True, 0.0,
                           f"skipped: {program} is not installed", database)
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PGCONNECT_TIMEOUT": "10"}
    proc = server.runner.run([str(program), "--install-missing", "-h", str(server.scratch.run),
                              "-p", str(server.port), "-U", server.role, "-d", database],
                             env=env, timeout=3600)
    seconds = time.monotonic() - started
    if proc.returncode == 0:
        return CheckResult(f"pg_amcheck {database}", "amcheck", True, seconds,
                           "no corruption found", database)
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return CheckResult(f"pg_amcheck {database}", "amcheck", False, seconds,
                       f"exit {proc.returncode}: " + " / ".join(text[:3])[:400], database)


def _run_checksums(server: Server) -> CheckResult:
    started = time.monotonic()
    proc = server.runner.run([str(server.bindir / "pg_checksums"), "--check", "-D",
                              str(server.scratch.data)], env={"PATH": "/usr/bin:/bin",
                                                              "LC_ALL": "C"}, timeout=3600)
    seconds = time.monotonic() - started
    text = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode == 0:
        return CheckResult("data checksums", "checksums", True, seconds,
                           "; ".join(line for line in text if "ad checksums" in line
                                     or "scanned" in line.lower())[:200] or "ok")
    return CheckResult("data checksums", "checksums", False, seconds,
                       f"pg_checksums exit {proc.returncode}: " + " / ".join(text[-3:])[:400])
