"""A drill's results: the report (phases, RTO, RPO, checks, verdict) and its forms, a human
summary, JSON, Prometheus textfile metrics and an HTML page; the results stored in the
repository (``drills/<UTC time>.<passed|failed|missed>.json``, create-only, through the codec)
and what ``walship status`` says about them (the last drill, the last successful one, overdue).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from walship.archive import Archive
from walship.drill.plan import DEFAULT_INTERVAL, DrillPlan, format_duration
from walship.errors import DrillFailed, ExitStatus, WalshipError

DRILLS_PREFIX = "drills/"
_KEY = re.compile(r"^drills/(\d{8}T\d{6}Z)(?:-\d+)?\.(passed|failed|missed)\.json$")


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
            "started": iso_utc(self.started), "finished": iso_utc(self.finished),
            "scratch": self.scratch, "port": self.port, "pg_bindir": self.pg_bindir,
            "phases": {name: round(seconds, 3) for name, seconds in self.phases.items()},
            "rto_seconds": _round(self.rto_seconds), "rpo_seconds": _round(self.rpo_seconds),
            "rpo_derivation": self.rpo_derivation,
            "last_replayed_transaction": iso_utc(self.last_replayed_transaction),
            "newest_archived_wal": {"name": self.newest_wal,
                                    "stored": iso_utc(self.newest_wal_stored),
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
            "next_drill_due": iso_utc((self.finished or self.started)
                                   + timedelta(seconds=self.plan.interval)),
        }


def iso_utc(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).isoformat() if value is not None else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


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
        return {"key": h.last_key, "result": h.last_result, "time": iso_utc(h.last_time),
                "last_success_time": iso_utc(h.last_success_time),
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
