"""``walship drill``: a restore drill that proves the disaster-recovery plan.

A drill restores a backup and the archived WAL into a scratch directory with the restore code
(:func:`walship.backup.restore.restore`, target action ``promote``, ``archive_mode = off``: the
scratch server never archives into the repository), starts PostgreSQL there on a free port
with its Unix socket inside the scratch directory and no TCP listener, waits until recovery
ends, runs the validation checks, stops the server and removes the scratch directory. It
measures, phase by phase, the backup fetch, WAL replay until consistent, until recovery ends and
until the first validation query is answered:

* **RTO** = drill start to the restored server answering the first validation query;
* **RPO** = how much committed work a disaster at drill time would lose: the drill's start
  minus the last transaction the drill recovered (``pg_last_xact_replay_timestamp()``; the
  backup's stop time when no transaction was replayed), reported with its derivation and the
  newest archived WAL's storage time.

What it promises:

* It never touches a running server: a port in use (TCP on 127.0.0.1 / ::1, or a socket in
  the usual socket directories) or a non-empty scratch directory is refused before anything
  is done. The scratch server runs with its own ``pg_hba.conf`` (trust, on its private socket
  only), ``listen_addresses = ''``, no ``primary_conninfo`` and no archiving.
* It never writes to the repository except its own result, ``drills/<UTC time>.<result>.json``
  (create-only, through the codec like every object).
* Nothing is left running nor in the scratch directory afterwards, after a failure or SIGTERM
  too (``keep`` leaves the directory, never a server).
* Exit statuses (mapped in :mod:`walship.errors`): 0 passed; ``DRILL_FAILED`` when the restore
  or a check failed; ``TARGET_MISSED`` when everything worked but the RTO or RPO target was
  missed.

The validation checks and targets come from the ``[drill]`` table of the config file
(:func:`parse_plan`) and the command line's flags.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from walship import wal
from walship.archive import Archive
from walship.errors import ExitStatus, NotFound, UsageError, WalshipError

DRILLS_PREFIX = "drills/"
RESULTS = ("passed", "failed", "missed")
DEFAULT_INTERVAL = 7 * 86400.0
DEFAULT_TIMEOUT = 6 * 3600.0
SOCKET_DIRS = ("/var/run/postgresql", "/run/postgresql", "/tmp")
_KEY = re.compile(r"^drills/(\d{8}T\d{6}Z)(?:-\d+)?\.(passed|failed|missed)\.json$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$")
_UNITS = {"s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
          "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
          "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
          "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800,
          "weeks": 604800}


class DrillFailed(WalshipError):
    """The restore or a validation check failed: the plan is not proven."""

    status = ExitStatus.DRILL_FAILED


class TargetMissed(WalshipError):
    """The drill restored and validated, but its RTO or RPO exceeded the target."""

    status = ExitStatus.TARGET_MISSED


class Interrupted(BaseException):
    """SIGTERM arrived during the drill: clean up and stop."""


# -- the plan: targets and checks ------------------------------------------------------------
def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds in a human duration: ``90s``, ``15min``, ``2h``, ``1d``, ``1.5h``."""
    match = _DURATION.match(text.lower()) if isinstance(text, str) else None
    if not match or match[2] not in _UNITS or not math.isfinite(float(match[1])):
        raise UsageError(f"invalid {what} {text!r}", "write a number and a unit",
                         "e.g. \"90s\", \"15min\", \"2h\", \"1d\"")
    return float(match[1]) * _UNITS[match[2]]


def format_duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:  # a target as written: 1 h, 15 min
            return f"{seconds / size:.0f} {unit}"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 86400:.1f} days"


@dataclass(frozen=True)
class SqlCheck:
    """A query and what it must return: at least ``min_rows`` rows, exactly ``value`` (the
    first column of the first row, as PostgreSQL prints it), or no row (``no_rows``)."""

    name: str
    sql: str
    database: str = "postgres"
    min_rows: int | None = None
    value: str | None = None
    no_rows: bool = False

    def expectation(self) -> str:
        if self.no_rows:
            return "no rows"
        if self.value is not None:
            return f"value {self.value!r}"
        return f"at least {self.min_rows if self.min_rows is not None else 1} rows"


@dataclass(frozen=True)
class DrillPlan:
    """Targets and checks of a drill (``[drill]`` table, then flags)."""

    rto: float | None = None
    rpo: float | None = None
    checks: tuple[SqlCheck, ...] = ()
    amcheck: tuple[str, ...] = ()
    checksums: bool = True
    user: str | None = None  # role the checks connect as (default: the server's OS user)
    scratch: str | None = None
    pg_bindir: str | None = None
    interval: float = DEFAULT_INTERVAL  # a successful drill is due this often (status)
    timeout: float = DEFAULT_TIMEOUT  # the whole restore and recovery


def describe_plan(plan: DrillPlan) -> str:
    """One line for ``walship check``."""
    parts = [f"RTO {format_duration(plan.rto) if plan.rto is not None else 'no target'}",
             f"RPO {format_duration(plan.rpo) if plan.rpo is not None else 'no target'}",
             f"{len(plan.checks)} SQL checks"]
    if plan.amcheck:
        parts.append("pg_amcheck on " + ", ".join(plan.amcheck))
    parts.append("data checksums checked" if plan.checksums else "data checksums not checked")
    parts.append(f"due every {format_duration(plan.interval)}")
    return ", ".join(parts)


_PLAN_KEYS = {"rto", "rpo", "check", "amcheck", "checksums", "user", "scratch", "pg_bindir",
              "interval", "timeout"}
_CHECK_KEYS = {"name", "sql", "database", "min_rows", "value", "no_rows"}


def _text(value: Any, name: str, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"invalid drill.{name} in {source}", "it must be non-empty text",
                         "write it in quotes")
    return value


def parse_plan(table: Mapping[str, Any], source: str = "the config file") -> DrillPlan:
    """The ``[drill]`` table, checked (unknown names and wrong types are refused)."""
    if not isinstance(table, Mapping):
        raise UsageError(f"[drill] in {source} must be a table")
    unknown = set(table) - _PLAN_KEYS
    if unknown:
        raise UsageError(f"[drill] in {source} has unknown settings: "
                         + ", ".join(sorted(unknown)), hint="see the README's 'Restore drills'")
    plan: dict[str, Any] = {}
    for name in ("rto", "rpo", "interval", "timeout"):
        if name in table:
            plan[name] = parse_duration(_text(table[name], name, source), f"drill.{name}")
    for name in ("user", "scratch", "pg_bindir"):
        if name in table:
            plan[name] = _text(table[name], name, source)
    if "checksums" in table:
        if not isinstance(table["checksums"], bool):
            raise UsageError(f"invalid drill.checksums in {source}", "it is true or false")
        plan["checksums"] = table["checksums"]
    if "amcheck" in table:
        databases = table["amcheck"]
        if not isinstance(databases, list) or not all(
                isinstance(d, str) and d for d in databases):
            raise UsageError(f"invalid drill.amcheck in {source}",
                             "it is a list of database names", 'e.g. amcheck = ["postgres"]')
        plan["amcheck"] = tuple(databases)
    checks = table.get("check", [])
    if not isinstance(checks, list):
        raise UsageError(f"invalid drill.check in {source}",
                         "write each check as a [[drill.check]] table")
    plan["checks"] = tuple(_parse_check(c, i, source) for i, c in enumerate(checks, 1))
    return DrillPlan(**plan)


def _parse_check(table: Any, number: int, source: str) -> SqlCheck:
    where = f"[[drill.check]] number {number} in {source}"
    if not isinstance(table, Mapping):
        raise UsageError(f"{where} is not a table")
    unknown = set(table) - _CHECK_KEYS
    if unknown:
        raise UsageError(f"{where} has unknown settings: " + ", ".join(sorted(unknown)),
                         hint="use name, sql, database and one of min_rows, value, no_rows")
    sql = _text(table.get("sql"), "check.sql", source)
    name = _text(table.get("name", f"check {number}"), "check.name", source)
    database = _text(table.get("database", "postgres"), "check.database", source)
    given = [k for k in ("min_rows", "value", "no_rows") if k in table]
    if len(given) > 1:
        raise UsageError(f"{where} has {' and '.join(given)}", "give one expectation")
    min_rows = table.get("min_rows")
    if min_rows is not None and (isinstance(min_rows, bool) or not isinstance(min_rows, int)
                                 or min_rows < 0):
        raise UsageError(f"invalid min_rows in {where}", "it is a whole number, 0 or more")
    value = table.get("value")
    if value is not None and not isinstance(value, str):
        raise UsageError(f"invalid value in {where}", "it is text, as PostgreSQL prints it",
                         'e.g. value = "42"')
    no_rows = table.get("no_rows", False)
    if not isinstance(no_rows, bool):
        raise UsageError(f"invalid no_rows in {where}", "it is true or false")
    return SqlCheck(name, sql, database, min_rows, value, no_rows)


def flag_check(text: str, *, no_rows: bool, number: int) -> SqlCheck:
    """A check from ``--expect-rows DB:SQL`` or ``--expect-no-rows DB:SQL``."""
    database, sep, sql = text.partition(":")
    if not sep or not database.strip() or not sql.strip() or " " in database.strip():
        raise UsageError(f"invalid check {text!r}", "write DATABASE:SQL",
                         "e.g. --expect-rows 'postgres:SELECT 1 FROM accounts'")
    flag = "--expect-no-rows" if no_rows else "--expect-rows"
    return SqlCheck(f"{flag} {number}", sql.strip(), database.strip(),
                    None if no_rows else 1, None, no_rows)


# -- results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    name: str
    kind: str  # sql, amcheck, checksums
    passed: bool
    seconds: float
    detail: str
    database: str | None = None


@dataclass
class DrillReport:
    """Everything a drill measured; plain values (see :meth:`to_dict`)."""

    started: datetime
    plan: DrillPlan
    target: str
    backup: str | None = None
    scratch: str | None = None
    port: int | None = None
    pg_bindir: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    rto_seconds: float | None = None
    rpo_seconds: float | None = None
    rpo_derivation: str = ""
    last_replayed_transaction: datetime | None = None
    newest_wal: str | None = None
    newest_wal_stored: datetime | None = None
    archive_timeout: float | None = None
    archive_timeout_note: str = ""
    checks: list[CheckResult] = field(default_factory=list)
    error: str | None = None
    finished: datetime | None = None
    stored_as: str | None = None

    @property
    def restored(self) -> bool:
        return self.error is None and self.rto_seconds is not None

    @property
    def checks_passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def missed(self) -> list[str]:
        """The targets missed, as ``rto 12.3 s > 1.0 s``."""
        out = []
        for name, actual, target in (("rto", self.rto_seconds, self.plan.rto),
                                     ("rpo", self.rpo_seconds, self.plan.rpo)):
            if target is not None and actual is not None and actual > target:
                out.append(f"{name.upper()} {format_duration(actual)} > target "
                           f"{format_duration(target)}")
        return out

    @property
    def result(self) -> str:
        if not self.restored or not self.checks_passed:
            return "failed"
        return "missed" if self.missed() else "passed"

    @property
    def passed(self) -> bool:
        return self.result == "passed"

    def cause(self) -> str:
        if self.error:
            return self.error
        failed = [c for c in self.checks if not c.passed]
        if failed:
            return "; ".join(f"check {c.name!r} failed: {c.detail}" for c in failed)
        return "; ".join(self.missed())

    def to_dict(self) -> dict[str, Any]:
        def met(actual: float | None, target: float | None) -> bool | None:
            if target is None or actual is None:
                return None
            return actual <= target

        newest_age = None
        if self.newest_wal_stored is not None:
            newest_age = round((self.started - self.newest_wal_stored).total_seconds(), 3)
        return {
            "backup": self.backup, "target": self.target,
            "started": _iso(self.started), "finished": _iso(self.finished),
            "scratch": self.scratch, "port": self.port, "pg_bindir": self.pg_bindir,
            "phases": {name: round(seconds, 3) for name, seconds in self.phases.items()},
            "rto_seconds": _round(self.rto_seconds), "rpo_seconds": _round(self.rpo_seconds),
            "rpo_derivation": self.rpo_derivation,
            "last_replayed_transaction": _iso(self.last_replayed_transaction),
            "newest_archived_wal": {"name": self.newest_wal,
                                    "stored": _iso(self.newest_wal_stored),
                                    "age_seconds_at_start": newest_age,
                                    "archive_timeout_seconds": self.archive_timeout,
                                    "note": self.archive_timeout_note or None},
            "targets": {"rto_seconds": self.plan.rto, "rpo_seconds": self.plan.rpo,
                        "rto_met": met(self.rto_seconds, self.plan.rto),
                        "rpo_met": met(self.rpo_seconds, self.plan.rpo)},
            "checks": [{"name": c.name, "kind": c.kind, "database": c.database,
                        "passed": c.passed, "seconds": round(c.seconds, 3),
                        "detail": c.detail} for c in self.checks],
            "error": self.error, "missed": self.missed(), "result": self.result,
            "passed": self.passed, "cause": None if self.passed else self.cause(),
            "next_drill_due": _iso((self.finished or self.started)
                                   + timedelta(seconds=self.plan.interval)),
        }


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).isoformat() if value is not None else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# -- the server's OS user, binaries, port, scratch --------------------------------------------
@dataclass(frozen=True)
class Runner:
    """Runs PostgreSQL's programs as its OS user: ``postgres`` when the drill runs as root
    (PostgreSQL refuses to run as root), else the current user."""

    user: pwd.struct_passwd | None

    @classmethod
    def for_current_user(cls) -> Runner:
        if os.geteuid() != 0:
            return cls(None)
        try:
            return cls(pwd.getpwnam("postgres"))
        except KeyError:
            raise UsageError("running as root and there is no postgres user",
                             "PostgreSQL refuses to run as root",
                             "run walship drill as PostgreSQL's OS user") from None

    @property
    def name(self) -> str:
        return (self.user or pwd.getpwuid(os.geteuid())).pw_name

    def own(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid, follow_symlinks=False)

    def run(self, args: list[str], *, env: Mapping[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        try:
            return subprocess.run(args, env=dict(env) if env is not None else None,
                                  capture_output=True, text=True, timeout=timeout, cwd="/",
                                  check=False, stdin=subprocess.DEVNULL, **kwargs)
        except subprocess.TimeoutExpired:
            raise DrillFailed(f"{Path(args[0]).name} did not finish in {timeout:.0f} s",
                              " ".join(args[1:4])) from None
        except OSError as error:
            raise DrillFailed(f"cannot run {args[0]}", os.strerror(error.errno or 0)) from None


def find_bindir(explicit: str | None, major: int) -> Path:
    """PostgreSQL's binaries for ``major``: ``explicit``, else ``pg_config --bindir`` when it is
    that version, else Debian's ``/usr/lib/postgresql/MAJOR/bin``."""
    if explicit:
        path = Path(explicit)
        if not (path / "pg_ctl").is_file():
            raise UsageError(f"no pg_ctl in {explicit}", hint="give --pg-bindir the directory "
                             "of PostgreSQL's server programs")
        return path
    candidates = []
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                             check=False, timeout=30).stdout.strip()
        if out:
            candidates.append(Path(out))
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append(Path(f"/usr/lib/postgresql/{major}/bin"))
    for path in candidates:
        if (path / "pg_ctl").is_file() and _major_of(path) == major:
            return path
    raise UsageError(f"PostgreSQL {major}'s server programs were not found", "the backup is of "
                     f"PostgreSQL {major}; pg_config --bindir is another version or absent",
                     f"install them (Debian: apt-get install postgresql-{major}) or give "
                     "--pg-bindir")


def _major_of(bindir: Path) -> int | None:
    try:
        out = subprocess.run([str(bindir / "pg_ctl"), "--version"], capture_output=True,
                             text=True, check=False, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(match[1]) if match else None


def port_in_use(port: int) -> str | None:
    """Why ``port`` cannot be used (a TCP listener or a socket file), or None."""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno in (98, 13):  # EADDRINUSE, EACCES
                return f"{host} port {port} is in use"
        finally:
            probe.close()
    for directory in SOCKET_DIRS:
        if os.path.lexists(os.path.join(directory, f".s.PGSQL.{port}")):
            return f"a server's socket {directory}/.s.PGSQL.{port} exists"
    return None


def choose_port(port: int | None) -> int:
    if port is not None:
        if not 1024 <= port <= 65535:
            raise UsageError(f"invalid port {port}", "use 1024 to 65535")
        why = port_in_use(port)
        if why:
            raise UsageError(f"port {port} is in use", why, "the drill never shares a port "
                             "with a server: choose another --port, or none (a free one)")
        return port
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            candidate = probe.getsockname()[1]
        if candidate >= 1024 and port_in_use(candidate) is None:
            return candidate
    raise DrillFailed("no free port was found", hint="give one with --port")


@dataclass(frozen=True)
class Scratch:
    """The drill's scratch directory: ``data/`` (the restored cluster), ``run/`` (socket,
    server log, pg_hba.conf) and tablespaces under ``tablespaces/``."""

    root: Path
    created: bool  # we made root (else it was an empty directory: only its content is ours)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.run / "postgres.log"


def make_scratch(path: str | None, runner: Runner) -> Scratch:
    """Create the scratch directory (``path`` must be absent or an empty directory; its parent
    must exist), or a new one under /var/tmp."""
    if path is None:
        root = Path(tempfile.mkdtemp(prefix="walship-drill-", dir="/var/tmp"))
        created = True
    else:
        root = Path(os.path.abspath(path))
        if any(ord(c) < 32 or c == "\x7f" for c in str(root)):
            raise UsageError("the scratch directory's name holds control characters",
                             hint="choose a plain path")
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            raise UsageError(f"scratch directory {root} is not a directory")
        for parent in root.parents:
            if (parent / "PG_VERSION").is_file():
                raise UsageError(f"scratch directory {root} is inside the PostgreSQL data "
                                 f"directory {parent}", "a drill never writes into a "
                                 "server's directory", "choose a directory outside it")
        if root.exists():
            if os.listdir(root):
                raise UsageError(f"scratch directory {root} is not empty", "it may be in use "
                                 "(a server's data, another drill)", "give an empty or new "
                                 "directory; the drill removes what it creates")
            created = False
        else:
            if not root.parent.is_dir():
                raise UsageError(f"cannot create scratch directory {root}",
                                 f"{root.parent} does not exist", "create it first")
            try:
                os.mkdir(root, 0o700)
            except OSError as error:
                raise UsageError(f"cannot create scratch directory {root}",
                                 os.strerror(error.errno or 0)) from None
            created = True
    if len(str(root)) > 80:  # the socket's path must fit in 107 bytes
        if created:
            shutil.rmtree(root, ignore_errors=True)
        raise UsageError(f"scratch directory {root} has too long a path",
                         "the server's socket inside it would exceed the 107-byte limit",
                         "choose a shorter path")
    scratch = Scratch(root, created)
    if created:
        os.chmod(root, 0o700)
        runner.own(root)
    for sub in (scratch.data, scratch.run):
        os.mkdir(sub, 0o700)
        runner.own(sub)
    return scratch


def remove_scratch(scratch: Scratch) -> None:
    """Remove what the drill created: the whole directory, or its content when it existed."""
    if scratch.created:
        shutil.rmtree(scratch.root, ignore_errors=True)
        return
    for entry in os.listdir(scratch.root):
        path = scratch.root / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


# -- the scratch server ------------------------------------------------------------------------
def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def server_environment(settings: Any, environ: Mapping[str, str] | None = None
                       ) -> dict[str, str]:
    """The scratch server's environment, so that its ``wal-fetch`` finds the repository and key
    the drill uses, whichever source they came from (flags, environment, config file)."""
    env = dict(os.environ if environ is None else environ)
    env["WALSHIP_REPO"] = settings.require_repo()
    if settings.encryption_key_file:
        env["WALSHIP_ENCRYPTION_KEY_FILE"] = os.path.abspath(settings.encryption_key_file)
    env["WALSHIP_CONFIG"] = settings.config_file or os.devnull
    names = {"connection_string": "AZURE_STORAGE_CONNECTION_STRING",
             "account": "AZURE_STORAGE_ACCOUNT", "account_key": "AZURE_STORAGE_KEY",
             "sas_token": "AZURE_STORAGE_SAS_TOKEN",
             "account_url": "AZURE_STORAGE_ACCOUNT_URL"}
    for name, variable in names.items():
        value = getattr(settings.azure, name, None)
        if value:
            env[variable] = value
    for variable in ("PGDATA", "PGPORT", "PGHOST"):
        env.pop(variable, None)
    return env


def controldata(runner: Runner, bindir: Path, data: Path) -> dict[str, str]:
    proc = runner.run([str(bindir / "pg_controldata"), "-D", str(data)],
                      env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
    if proc.returncode != 0:
        raise DrillFailed("pg_controldata failed on the restored directory",
                          _last_line(proc.stderr))
    return {k.strip(): v.strip() for k, _, v in
            (line.partition(":") for line in proc.stdout.splitlines()) if v}


def configure(scratch: Scratch, runner: Runner, port: int, control: Mapping[str, str]) -> None:
    """Make the restored cluster a private scratch server (appended to postgresql.auto.conf,
    so these lines win; a missing postgresql.conf, as on Debian, is written)."""
    hba = scratch.run / "pg_hba.conf"
    hba.write_text("# walship drill: trust on the drill's private socket only\n"
                   "local all all trust\n")
    runner.own(hba)
    conf = scratch.data / "postgresql.conf"
    if not conf.exists():
        lines = ["# walship drill: the backup holds no postgresql.conf; the settings that",
                 "# recovery needs at least as high as the primary's (from pg_control)"]
        for setting, label in (("max_connections", "max_connections setting"),
                               ("max_worker_processes", "max_worker_processes setting"),
                               ("max_wal_senders", "max_wal_senders setting"),
                               ("max_prepared_transactions", "max_prepared_xacts setting"),
                               ("max_locks_per_transaction", "max_locks_per_xact setting")):
            if control.get(label, "").isdigit():
                lines.append(f"{setting} = {control[label]}")
        conf.write_text("\n".join(lines) + "\n")
        os.chmod(conf, 0o600)
        runner.own(conf)
    settings = {"port": str(port), "listen_addresses": _quote(""),
                "unix_socket_directories": _quote(str(scratch.run)),
                "hba_file": _quote(str(hba)), "archive_mode": "off",
                "hot_standby": "on", "primary_conninfo": _quote(""),
                "primary_slot_name": _quote(""), "synchronous_standby_names": _quote(""),
                "logging_collector": "off", "log_destination": _quote("stderr"),
                "ssl": "off", "cluster_name": _quote("walship-drill"),
                "log_line_prefix": _quote("%m [%p] "), "log_timezone": _quote("UTC")}
    with open(scratch.data / "postgresql.auto.conf", "a", encoding="utf-8") as auto:
        auto.write("# walship drill: a private scratch server (these lines win)\n")
        auto.writelines(f"{name} = {value}\n" for name, value in settings.items())


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def server_failure(log: Path) -> str:
    """The server log's last FATAL/PANIC/ERROR lines (what stopped recovery)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "no server log"
    wanted = [line.strip() for line in text.splitlines()
              if re.search(r"\b(FATAL|PANIC|ERROR):", line)]
    picked = wanted[-3:] if wanted else text.strip().splitlines()[-3:]
    return " / ".join(picked)[-900:]


class Server:
    """The scratch server: started with pg_ctl, watched, stopped."""

    def __init__(self, scratch: Scratch, runner: Runner, bindir: Path, port: int,
                 env: Mapping[str, str], role: str) -> None:
        self.scratch, self.runner, self.bindir, self.port = scratch, runner, bindir, port
        self.env, self.role = env, role
        self.started = False

    def start(self) -> None:
        self.started = True
        proc = self.runner.run([str(self.bindir / "pg_ctl"), "-D", str(self.scratch.data),
                                "-l", str(self.scratch.log), "-W", "start"], env=self.env)
        if proc.returncode != 0:
            raise DrillFailed("the scratch server did not start", _last_line(
                proc.stderr) or server_failure(self.scratch.log))

    def pid(self) -> int | None:
        try:
            pid = int((self.scratch.data / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def connect(self, database: str = "postgres", timeout: int = 10):
        import psycopg

        return psycopg.connect(host=str(self.scratch.run), port=self.port, user=self.role,
                               dbname=database, connect_timeout=timeout, autocommit=True,
                               application_name="walship drill")

    def stop(self) -> None:
        """Stop the server (fast, then immediate), then walship's prefetch worker."""
        if self.started and self.pid() is not None:
            for mode in ("fast", "immediate"):
                try:
                    self.runner.run([str(self.bindir / "pg_ctl"), "-D", str(self.scratch.data),
                                     "-m", mode, "-w", "-t", "60", "stop"], env=self.env,
                                    timeout=90)
                except DrillFailed:
                    pass
                if self.pid() is None:
                    break
            deadline = time.monotonic() + 10
            while self.pid() is not None and time.monotonic() < deadline:
                time.sleep(0.05)
        stop_prefetch_worker(self.scratch.data)


def stop_prefetch_worker(data: Path) -> None:
    """End the detached ``wal-fetch`` prefetch worker of the scratch cluster (its pid is in the
    cache's lock file; it is signalled only if it is that worker, working in that cluster)."""
    cache = data / "pg_wal" / "walship" / "prefetch"
    try:
        pid = int((cache / "worker.lock").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, ValueError, IndexError):
        return
    if not any(b"walship.prefetch" in part for part in cmdline):
        return
    if cwd != str(data) and str(cache).encode() not in cmdline:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


# -- the drill ---------------------------------------------------------------------------------
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
    if options.backup and options.backup.upper() != catalog.LATEST:
        manifest = catalog.resolve(archive, options.backup)
    else:
        manifests = [e.manifest for e in catalog.list_backups(archive) if e.manifest]
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
            _newest_wal(archive, report, options)
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

        report.error = redact(f"{type(error).__name__}: {_last_line(str(error))}", limit=500)
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


def _newest_wal(archive: Archive, report: DrillReport, options: DrillOptions) -> None:
    from walship import layout

    newest: tuple[float, str] | None = None
    for info in archive.storage.list(layout.WAL_PREFIX):
        if info.modified is not None and (newest is None or info.modified > newest[0]):
            newest = (info.modified, layout.wal_name(info.key))
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
        text = _last_line(str(error)) or type(error).__name__
        return None, "cannot query the primary: " + redact(text,
                                                            hide=connection_secrets(dbname))
    return (float(row[0]) if row else None), ""


def _restore_and_check(archive: Archive, settings: Any, manifest: Any, target: Any,
                       scratch: Scratch, server: Server, report: DrillReport, t0: float,
                       clock: Callable[[], float], log: Callable[[str], None]) -> None:
    from walship.backup.restore import restore

    spaces = {t.oid: str(scratch.root / "tablespaces" / str(t.oid))
              for t in manifest.tablespaces}
    if spaces:
        os.mkdir(scratch.root / "tablespaces", 0o700)
        runner_own = server.runner.own
        runner_own(scratch.root / "tablespaces")
    try:
        restore(archive, scratch.data, target, action="promote", backup=manifest.name,
                tablespace_map=spaces, archive_mode_off=True, parallel=settings.parallel)
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
    conn = None
    in_recovery = True
    while conn is None:
        conn, in_recovery = _try_connect(server)
        if conn is None:
            _check_alive(server, clock, deadline, "reach a consistent state")
            time.sleep(0.1)
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
                while conn is None:
                    conn, in_recovery = _try_connect(server)
                    if conn is None:
                        _check_alive(server, clock, deadline, "end recovery")
                        time.sleep(0.1)
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
        how = (f"drill start {_iso(report.started)} minus the last transaction recovered, "
               f"{_iso(last_xact)} (pg_last_xact_replay_timestamp())")
    else:
        report.rpo_seconds = max(0.0, (report.started - manifest.stop_time).total_seconds())
        how = (f"drill start {_iso(report.started)} minus the backup's stop time "
               f"{_iso(manifest.stop_time)}: no transaction was replayed from the archive")
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
                           f"query failed: {_last_line(str(error))[:300]}", check.database)
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


# -- reports -----------------------------------------------------------------------------------
def human_summary(report: DrillReport) -> str:
    lines = [(f"walship drill: backup {report.backup or '-'}, target {report.target}, "
             f"started {report.started.strftime('%Y-%m-%d %H:%M:%S')} UTC")]
    labels = {"backup_fetch": "backup fetch", "wal_replay_until_consistent":
              "WAL replay until consistent", "until_recovery_end": "until recovery ended",
              "first_query": "first query answered"}
    for name, seconds in report.phases.items():
        lines.append(f"  {labels.get(name, name):30} {seconds:9.2f} s")

    def against(actual: float | None, target: float | None) -> str:
        if actual is None:
            return "not measured"
        text = format_duration(actual)
        if target is None:
            return text + " (no target)"
        met = "met" if actual <= target else "MISSED"
        return f"{text} (target {format_duration(target)}: {met})"

    lines.append(f"RTO  {against(report.rto_seconds, report.plan.rto)}")
    lines.append(f"RPO  {against(report.rpo_seconds, report.plan.rpo)}")
    if report.rpo_derivation:
        lines.append(f"     = {report.rpo_derivation}")
    if report.archive_timeout_note:
        lines.append(f"archive: {report.archive_timeout_note}")
    for check in report.checks:
        state = "ok    " if check.passed else "FAILED"
        where = f" [{check.database}]" if check.database else ""
        lines.append(f"check {state} {check.seconds:7.2f} s  {check.name}{where}: "
                     f"{check.detail}")
    verdict = {"passed": "PASSED", "failed": "FAILED", "missed": "TARGET MISSED"}
    lines.append(f"{verdict[report.result]}" + ("" if report.passed else f": {report.cause()}"))
    data = report.to_dict()
    lines.append(f"next drill due by {data['next_drill_due'][:19].replace('T', ' ')} UTC"
                 + (f"; result stored as {report.stored_as}" if report.stored_as else ""))
    return "\n".join(lines) + "\n"


def html_report(report: DrillReport) -> str:
    """A self-contained HTML page of the drill (for a web server or an e-mail); every value
    is escaped."""
    from html import escape

    def row(*cells: object, head: bool = False) -> str:
        tag = "th" if head else "td"
        return "<tr>" + "".join(f"<{tag}>{escape(str(c))}</{tag}>" for c in cells) + "</tr>"

    def target(actual: float | None, goal: float | None) -> tuple[str, str, str]:
        shown = "-" if actual is None else format_duration(actual)
        if goal is None:
            return shown, "no target", ""
        return shown, format_duration(goal), (
            "" if actual is None else "met" if actual <= goal else "MISSED")

    verdict = {"passed": "PASSED", "failed": "FAILED", "missed": "TARGET MISSED"}[report.result]
    colour = {"passed": "#1a7f37", "failed": "#cf222e", "missed": "#bf8700"}[report.result]
    data = report.to_dict()
    summary = "Restored, validated, targets met." if report.passed else report.cause()
    title = f"walship drill {report.started.strftime('%Y-%m-%d %H:%M')} UTC: {verdict}"
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}")
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
        f"<title>{escape(title)}</title>", f"<style>{style}</style></head><body>",
        f"<h1 style=\"color:{colour}\">walship drill: {verdict}</h1>",
        f"<p>{escape(summary)}</p>",
        "<table>", row("backup", report.backup or "-"), row("target", report.target),
        row("started (UTC)", report.started.strftime("%Y-%m-%d %H:%M:%S")),
        row("next drill due (UTC)", str(data["next_drill_due"])[:19].replace("T", " ")),
        "</table>",
        "<h2>Objectives</h2><table>", row("", "measured", "target", "", head=True),
        row("RTO", *target(report.rto_seconds, report.plan.rto)),
        row("RPO", *target(report.rpo_seconds, report.plan.rpo)), "</table>",
        f"<p>RPO: {escape(report.rpo_derivation)}</p>" if report.rpo_derivation else "",
        f"<p>Archive: {escape(report.archive_timeout_note)}</p>"
        if report.archive_timeout_note else "",
        "<h2>Phases</h2><table>", row("phase", "seconds", head=True),
        *(row(name, f"{seconds:.2f}") for name, seconds in report.phases.items()), "</table>",
        "<h2>Checks</h2><table>", row("check", "database", "result", "seconds", "detail",
                                      head=True),
        *(row(c.name, c.database or "-", "ok" if c.passed else "FAILED", f"{c.seconds:.2f}",
              c.detail) for c in report.checks), "</table>",
        "</body></html>"]
    return "\n".join(part for part in parts if part) + "\n"


def prometheus_text(report: DrillReport) -> str:
    """The drill's metrics for node_exporter's textfile collector (unknown values omitted)."""
    finished = report.finished or report.started
    metrics: list[tuple[str, str, list[tuple[str, float | None]]]] = [
        ("walship_drill_passed", ("1 if the last drill restored, validated and met its "
         "targets, else 0."), [("", 1 if report.passed else 0)]),
        ("walship_drill_restore_ok", "1 if the last drill's restore and checks succeeded.",
         [("", 1 if report.restored and report.checks_passed else 0)]),
        ("walship_drill_rto_seconds", "Measured RTO of the last drill.",
         [("", report.rto_seconds)]),
        ("walship_drill_rpo_seconds", "Measured RPO of the last drill.",
         [("", report.rpo_seconds)]),
        ("walship_drill_rto_target_seconds", "RTO target.", [("", report.plan.rto)]),
        ("walship_drill_rpo_target_seconds", "RPO target.", [("", report.plan.rpo)]),
        ("walship_drill_phase_seconds", "Seconds of each phase of the last drill.",
         [(f'{{phase="{name}"}}', seconds) for name, seconds in report.phases.items()]),
        ("walship_drill_checks", "Validation checks of the last drill, by result.",
         [('{result="passed"}', sum(c.passed for c in report.checks)),
          ('{result="failed"}', sum(not c.passed for c in report.checks))]),
        ("walship_drill_last_run_timestamp_seconds", "When the last drill finished.",
         [("", finished.timestamp())]),
    ]
    if report.passed:
        metrics.append(("walship_drill_last_success_timestamp_seconds",
                        "When the last successful drill finished.",
                        [("", finished.timestamp())]))
    return _metrics(metrics)


def _metrics(metrics: list[tuple[str, str, list[tuple[str, float | None]]]]) -> str:
    lines: list[str] = []
    for name, help_text, samples in metrics:
        present = [(labels, value) for labels, value in samples if value is not None]
        if not present:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for labels, value in present:
            lines.append(f"{name}{labels} {float(value):.3f}".rstrip("0").rstrip("."))
    return "\n".join(lines) + "\n"


# -- results in the repository ----------------------------------------------------------------
def store_result(archive: Archive, report: DrillReport) -> str:
    """Store the report as ``drills/<UTC time>.<result>.json`` (create-only)."""
    from walship.errors import AlreadyExists

    data = json.dumps(report.to_dict(), indent=2).encode()
    stamp = report.started.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1, 100):
        suffix = "" if attempt == 1 else f"-{attempt}"
        key = f"{DRILLS_PREFIX}{stamp}{suffix}.{report.result}.json"
        stored = archive.codec.stored_form(key, [data], size_hint=len(data))
        try:
            archive.storage.put(key, stored, metadata=stored.metadata)
        except AlreadyExists:
            continue
        except OSError as error:
            raise DrillFailed("cannot store the drill's result", os.strerror(error.errno or 0),
                              "check the repository's owner and permissions") from None
        _give_to_repository_owner(archive, key)
        return key
    raise DrillFailed("cannot store the drill's result", "100 results share its second")


def _give_to_repository_owner(archive: Archive, key: str) -> None:
    """Run as root on a file:// repository, give ``drills/`` and the result just stored to the
    repository directory's owner, so that the next drill, run as that user, can store its own
    (a root-owned ``drills/`` would refuse it)."""
    root = getattr(archive.storage, "root", None)
    if os.geteuid() != 0 or not isinstance(root, Path):
        return
    try:
        owner = os.stat(root)
        if owner.st_uid == 0:
            return
        for path in (root / DRILLS_PREFIX.rstrip("/"), root / key):
            status = os.lstat(path)
            if status.st_uid == 0 and not os.path.islink(path):
                os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)
    except OSError:
        pass


@dataclass(frozen=True)
class DrillHistory:
    """The last drill and the last successful one, from the keys under ``drills/``."""

    last_key: str | None = None
    last_result: str | None = None
    last_time: datetime | None = None
    last_success_time: datetime | None = None
    drills: int = 0
    last: Mapping[str, Any] | None = None


def drill_history(archive: Archive, *, read_last: bool = True) -> DrillHistory:
    """One LIST of ``drills/``; the newest result is read (decoded) when ``read_last``."""
    found: list[tuple[str, str, str]] = []
    for info in archive.storage.list(DRILLS_PREFIX):
        match = _KEY.match(info.key)
        if match:
            found.append((match[1], info.key, match[2]))
    if not found:
        return DrillHistory()
    found.sort()

    def when(stamp: str) -> datetime:
        return datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)

    stamp, key, result = found[-1]
    success = [s for s, _, r in found if r == "passed"]
    last = None
    if read_last:
        try:
            with archive.storage.get(key) as download:
                last = json.loads(b"".join(archive.codec.decode(key, download,
                                                                download.info.metadata)))
        except (WalshipError, ValueError):
            last = None
    return replace(DrillHistory(key, result, when(stamp), when(success[-1]) if success
                                else None, len(found)), last=last)


@dataclass(frozen=True)
class DrillStatus:
    """What ``walship status`` says about drills: the last one, the last successful one, and
    whether a successful drill is overdue (none within ``interval``)."""

    history: DrillHistory
    interval: float
    now: datetime

    @property
    def success_age(self) -> float | None:
        last = self.history.last_success_time
        return None if last is None else max(0.0, (self.now - last).total_seconds())

    @property
    def overdue(self) -> bool:
        age = self.success_age
        return age is None or age > self.interval

    def line(self) -> str:
        h = self.history
        if h.last_time is None:
            return f"none (OVERDUE: no successful drill within {format_duration(self.interval)})"
        age = format_duration(max(0.0, (self.now - h.last_time).total_seconds()))
        text = f"{h.last_time.strftime('%Y-%m-%d %H:%M:%S')} UTC ({age} ago): {h.last_result}"
        last = h.last or {}
        if last.get("rto_seconds") is not None:
            text += f", RTO {format_duration(last['rto_seconds'])}"
        if last.get("rpo_seconds") is not None:
            text += f", RPO {format_duration(last['rpo_seconds'])}"
        if h.last_result != "passed" and last.get("cause"):
            text += f" ({last['cause'][:200]})"
        if self.overdue:
            since = ("ever" if h.last_success_time is None else
                     f"since {h.last_success_time.strftime('%Y-%m-%d %H:%M')} UTC")
            text += (f"; OVERDUE: no successful drill {since} (due every "
                     f"{format_duration(self.interval)})")
        return text

    def as_dict(self) -> dict[str, Any]:
        h = self.history
        return {"key": h.last_key, "result": h.last_result, "time": _iso(h.last_time),
                "last_success_time": _iso(h.last_success_time),
                "last_success_age_seconds": _round(self.success_age),
                "interval_seconds": self.interval, "overdue": self.overdue,
                "drills": h.drills, "report": h.last}

    def prometheus(self) -> str:
        h = self.history
        return _metrics([
            ("walship_last_drill_timestamp_seconds", "When the newest drill started.",
             [("", h.last_time.timestamp() if h.last_time else None)]),
            ("walship_last_drill_passed", "1 if the newest drill passed, else 0.",
             [("", None if h.last_result is None else int(h.last_result == "passed"))]),
            ("walship_last_successful_drill_timestamp_seconds",
             "When the newest successful drill started.",
             [("", h.last_success_time.timestamp() if h.last_success_time else None)]),
            ("walship_last_successful_drill_age_seconds",
             "Seconds since the newest successful drill started.", [("", self.success_age)]),
            ("walship_drill_overdue", "1 if no drill passed within drill.interval.",
             [("", int(self.overdue))]),
        ])


def drill_status(archive: Archive, interval: float = DEFAULT_INTERVAL,
                 now: datetime | None = None) -> DrillStatus:
    return DrillStatus(drill_history(archive), interval, now or datetime.now(timezone.utc))


def exit_for(report: DrillReport) -> int:
    return {"passed": ExitStatus.OK, "failed": ExitStatus.DRILL_FAILED,
            "missed": ExitStatus.TARGET_MISSED}[report.result]


__all__ = ["DrillFailed", "DrillPlan", "DrillReport", "NotFound", "SqlCheck", "TargetMissed",
           "drill_history", "parse_duration", "parse_plan", "run_drill", "store_result"]
