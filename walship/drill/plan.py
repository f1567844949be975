"""The plan a drill proves: its RTO and RPO targets and its validation checks, from the
``[drill]`` table of the config file (:func:`parse_plan`, which refuses unknown names and wrong
types) and the command line's flags; human durations (``90s``, ``15min``, ``2h``, ``1d``)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from walship.errors import UsageError

DEFAULT_INTERVAL = 7 * 86400.0
DEFAULT_TIMEOUT = 6 * 3600.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$")
_UNITS = {"s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
          "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
          "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
          "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800,
          "weeks": 604800}


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
    if seconds < 1:
        return f"{seconds:.2f} s"
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
