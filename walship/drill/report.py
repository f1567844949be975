"""A drill's results: the report (phases, RTO, RPO, checks, verdict, the repository's
recoverable window) and its forms, a human summary, JSON, Prometheus textfile metrics and a
self-contained HTML page with charts (inline SVG, no script); the results stored in the
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


@dataclass(frozen=True)
class BackupSpan:
    """A complete backup of the repository, as the recoverable window shows it."""

    name: str
    timeline: int
    start_time: datetime
    stop_time: datetime
    start_wal: str
    stop_wal: str


@dataclass(frozen=True)
class WalRange:
    """Consecutive archived segments ``first``..``last`` of one timeline and when the first
    and the last were stored (the objects' modification times)."""

    timeline: int
    first: str
    last: str
    segments: int
    first_stored: datetime | None
    last_stored: datetime | None


@dataclass(frozen=True)
class RecoverableWindow:
    """The repository as the drill found it: its complete backups and its WAL coverage per
    timeline (runs of consecutive segments; between two runs of a timeline lies a gap)."""

    backups: tuple[BackupSpan, ...] = ()
    wal: tuple[WalRange, ...] = ()
    ranges_left_out: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "backups": [{"name": b.name, "timeline": b.timeline,
                         "start_time": iso_utc(b.start_time), "stop_time": iso_utc(b.stop_time),
                         "start_wal": b.start_wal, "stop_wal": b.stop_wal}
                        for b in self.backups],
            "wal": [{"timeline": r.timeline, "first": r.first, "last": r.last,
                     "segments": r.segments, "first_stored": iso_utc(r.first_stored),
                     "last_stored": iso_utc(r.last_stored)} for r in self.wal],
            "wal_ranges_left_out": self.ranges_left_out,
        }


MAX_WAL_RANGES = 200


def recoverable_window(manifests: list[Any], wal_objects: list[tuple[str, float | None]],
                       segment_size: int) -> RecoverableWindow:
    """The window from the backups' manifests and the archived WAL (file name, stored time):
    runs of consecutive segments per timeline, the newest :data:`MAX_WAL_RANGES` kept."""
    from walship import wal

    backups = tuple(sorted((BackupSpan(m.name, m.timeline, m.start_time, m.stop_time,
                                       m.start_wal, m.stop_wal) for m in manifests),
                           key=lambda b: b.start_time))
    numbers: dict[int, dict[int, float | None]] = {}
    for name, stored in wal_objects:
        try:
            item = wal.parse_name(name)
        except ValueError:
            continue
        if item.kind is wal.FileKind.SEGMENT:
            numbers.setdefault(item.timeline, {})[item.segment_number(segment_size)] = stored
    ranges: list[WalRange] = []

    def when(value: float | None) -> datetime | None:
        return None if value is None else datetime.fromtimestamp(value, timezone.utc)

    for timeline in sorted(numbers):
        found = numbers[timeline]
        run: list[int] = []
        for n in sorted(found) + [-1]:
            if run and n == run[-1] + 1:
                run.append(n)
                continue
            if run:
                times = [found[i] for i in run if found[i] is not None]
                ranges.append(WalRange(timeline, wal.segment_name(timeline, run[0], segment_size),
                                       wal.segment_name(timeline, run[-1], segment_size),
                                       len(run), when(min(times) if times else None),
                                       when(max(times) if times else None)))
            run = [n]
    left_out = max(0, len(ranges) - MAX_WAL_RANGES)
    return RecoverableWindow(backups, tuple(ranges[left_out:]), left_out)


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
    window: RecoverableWindow | None = None

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
            "recoverable_window": self.window.to_dict() if self.window else None,
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


PHASE_LABELS = {"backup_fetch": "backup fetch",
                "wal_replay_until_consistent": "WAL replay until consistent",
                "until_recovery_end": "until recovery ended",
                "first_query": "first query answered"}
_GREEN, _RED, _AMBER, _GREY, _BLUE = "#1a7f37", "#cf222e", "#bf8700", "#8c959f", "#0969da"


def html_report(report: DrillReport) -> str:
    """A self-contained HTML page of the drill (for a web server, an e-mail or drill minutes):
    targets against measured, the phases on a time axis, the checks and the repository's
    recoverable window as charts (inline SVG, no script, font or anything fetched), beside
    tables whose figures are the JSON report's (``data-seconds`` / ``data-time`` hold the JSON
    values). Every value is escaped."""
    from html import escape

    data = report.to_dict()

    def cell(value: object, tag: str = "td", **attrs: object) -> str:
        extra = "".join(f' {k.replace("_", "-")}="{escape(str(v))}"' for k, v in attrs.items()
                        if v is not None)
        return f"<{tag}{extra}>{escape(str(value))}</{tag}>"

    def head(*names: str) -> str:
        return "<tr>" + "".join(cell(n, "th") for n in names) + "</tr>"

    def seconds_cell(value: float | None) -> str:
        return cell("-" if value is None else format_duration(value), data_seconds=value)

    def when(value: str | None) -> str:
        return "-" if value is None else value[:19].replace("T", " ")

    def time_cell(value: str | None) -> str:
        return cell(when(value), data_time=value)

    verdict = {"passed": "PASSED", "failed": "FAILED", "missed": "TARGET MISSED"}[report.result]
    colour = {"passed": _GREEN, "failed": _RED, "missed": _AMBER}[report.result]
    summary = "Restored, validated, targets met." if report.passed else report.cause()
    title = f"walship drill {report.started.strftime('%Y-%m-%d %H:%M')} UTC: {verdict}"
    style = ("body{font-family:sans-serif;margin:1.5em 2em;color:#1f2328;max-width:1000px}"
             "h1{margin:.2em 0}h2{margin:1.4em 0 .4em;font-size:1.2em;border-bottom:1px solid "
             "#d0d7de}table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid "
             "#d0d7de;padding:.25em .6em;text-align:left;font-size:.92em}th{background:#f6f8fa}"
             "td[data-seconds]{text-align:right}.met{color:#1a7f37;font-weight:bold}"
             ".missed{color:#cf222e;font-weight:bold}p{margin:.4em 0}.note{color:#57606a;"
             "font-size:.9em}svg{display:block;margin:.4em 0}")
    objectives = [("RTO", "rto", report.rto_seconds, report.plan.rto),
                  ("RPO", "rpo", report.rpo_seconds, report.plan.rpo)]

    def result_cell(key: str) -> str:
        met = data["targets"][f"{key}_met"]
        text = "no target" if met is None else "met" if met else "MISSED"
        return (f'<td class="{"met" if met else "missed" if met is False else ""}">'
                f"{escape(text)}</td>")

    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>", f"<style>{style}</style></head><body>",
        f'<h1 style="color:{colour}">walship drill: {verdict}</h1>',
        f'<p id="summary">{escape(summary)}</p>',
        '<table id="drill">',
        f"<tr>{cell('backup', 'th')}{cell(report.backup or '-')}</tr>",
        f"<tr>{cell('recovery target', 'th')}{cell(report.target)}</tr>",
        f"<tr>{cell('started (UTC)', 'th')}{time_cell(data['started'])}</tr>",
        f"<tr>{cell('finished (UTC)', 'th')}{time_cell(data['finished'])}</tr>",
        f"<tr>{cell('next drill due (UTC)', 'th')}{time_cell(data['next_drill_due'])}</tr>",
        f"<tr>{cell('result stored as', 'th')}{cell(report.stored_as or '-')}</tr>"
        if report.stored_as else "",
        "</table>",
        "<h2>Objectives: measured against the targets</h2>",
        _objectives_svg(objectives),
        '<table id="objectives">', head("objective", "measured", "target", "result"),
        *(f'<tr data-objective="{key}">{cell(name, "th")}{seconds_cell(data[f"{key}_seconds"])}'
          f'{seconds_cell(data["targets"][f"{key}_seconds"])}{result_cell(key)}</tr>'
          for name, key, _, _ in objectives),
        "</table>",
        ('<p class="note">RTO: drill start to the first validation query answered by the '
         "restored, promoted server.</p>"),
        f'<p class="note">RPO = {escape(report.rpo_derivation)}</p>'
        if report.rpo_derivation else "",
        f'<p class="note">Archive: {escape(report.archive_timeout_note)}</p>'
        if report.archive_timeout_note else "",
        "<h2>Phases of the restore (the RTO is their sum)</h2>",
        _phases_svg(data["phases"], report.plan.rto),
        '<table id="phases">', head("phase", "from (s)", "seconds"),
        *_phase_rows(data["phases"], cell),
        "</table>",
        "<h2>Validation checks</h2>",
        '<table id="checks">', head("check", "database", "result", "seconds", "detail"),
        *(f'<tr data-check="{escape(c["name"])}">{cell(c["name"])}{cell(c["database"] or "-")}'
          f'<td class="{"met" if c["passed"] else "missed"}">'
          f'{"ok" if c["passed"] else "FAILED"}</td>'
          f'{cell(format(c["seconds"], ".2f"), data_seconds=c["seconds"])}'
          f'{cell(c["detail"])}</tr>' for c in data["checks"]),
        "</table>" if data["checks"] else "</table><p>No check ran.</p>",
        *_window_html(report, data, cell, head, time_cell),
        "</body></html>"]
    return "\n".join(part for part in parts if part) + "\n"


def _nice_step(span: float, ticks: int = 6) -> float:
    """A 1, 2 or 5 times a power of ten step giving at most ``ticks`` ticks over ``span``."""
    import math

    raw = max(span, 1e-9) / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _svg_text(x: float, y: float, text: str, *, anchor: str = "start", size: int = 12,
              fill: str = "#1f2328", weight: str = "normal") -> str:
    from html import escape

    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" fill="{fill}" '
            f'text-anchor="{anchor}" font-weight="{weight}">{escape(text)}</text>')


def _objectives_svg(objectives: list[tuple[str, str, float | None, float | None]]) -> str:
    """Per objective, a bar of the measured value and a line at the target, on one scale each
    (the larger of the two and a margin)."""
    left, width, row = 60, 760, 34
    out = [(f'<svg id="objectives-chart" xmlns="http://www.w3.org/2000/svg" width="900" '
            f'height="{row * len(objectives) + 10}" role="img" aria-label="measured against '
            'target">')]
    for i, (name, _, actual, goal) in enumerate(objectives):
        y = 8 + i * row
        out.append(_svg_text(4, y + 17, name, weight="bold", size=14))
        if actual is None:
            out.append(_svg_text(left, y + 17, "not measured", fill=_GREY))
            continue
        scale = max(actual, goal or 0) * 1.15 or 1.0
        colour = _GREY if goal is None else _GREEN if actual <= goal else _RED
        bar = max(2.0, width * actual / scale)
        out.append(f'<rect x="{left}" y="{y + 4}" width="{bar:.1f}" height="18" '
                   f'fill="{colour}"/>')
        label = format_duration(actual) + ("" if goal is None else
                                           f" (target {format_duration(goal)})")
        out.append(_svg_text(left + bar + 6, y + 17, label))
        if goal is not None:
            gx = left + width * goal / scale
            out.append(f'<line x1="{gx:.1f}" y1="{y}" x2="{gx:.1f}" y2="{y + 26}" '
                       'stroke="#1f2328" stroke-width="2" stroke-dasharray="4 2"/>')
    out.append("</svg>")
    return "".join(out)


def _phase_rows(phases: dict[str, float], cell: Any) -> list[str]:
    rows, at = [], 0.0
    for name, seconds in phases.items():
        rows.append(f'<tr data-phase="{name}">{cell(PHASE_LABELS.get(name, name))}'
                    f'{cell(format(at, ".2f"), data_seconds=round(at, 3))}'
                    f'{cell(format(seconds, ".2f"), data_seconds=seconds)}</tr>')
        at += seconds
    return rows


def _phases_svg(phases: dict[str, float], rto_target: float | None) -> str:
    """The phases as bars on a seconds axis, one row each, end to end; the RTO target as a
    dashed line when it falls on the axis (within twice the measured RTO)."""
    if not phases:
        return '<p class="note">The drill ended before its first phase.</p>'
    total = sum(phases.values())
    span = max(total, rto_target or 0.0) if rto_target and rto_target <= 2 * total else total
    span = span * 1.05 or 1.0
    left, width, row = 210, 660, 26
    height = 30 + row * len(phases) + 26
    out = [(f'<svg id="phases-chart" xmlns="http://www.w3.org/2000/svg" width="900" '
            f'height="{height}" role="img" aria-label="phases on a time axis">')]
    step = _nice_step(span)
    tick = 0.0
    axis_y = 22 + row * len(phases)
    while tick <= span + 1e-9:
        x = left + width * tick / span
        out.append(f'<line x1="{x:.1f}" y1="14" x2="{x:.1f}" y2="{axis_y}" stroke="#d0d7de"/>')
        out.append(_svg_text(x, axis_y + 16, f"{tick:g} s", anchor="middle", size=11,
                             fill="#57606a"))
        tick += step
    at = 0.0
    colours = [_BLUE, "#8250df", "#bf3989", _GREEN, "#953800", "#1b7c83"]
    for i, (name, seconds) in enumerate(phases.items()):
        y = 18 + i * row
        x = left + width * at / span
        bar = max(1.5, width * seconds / span)
        out.append(_svg_text(4, y + 14, PHASE_LABELS.get(name, name)))
        out.append(f'<rect x="{x:.1f}" y="{y}" width="{bar:.1f}" height="18" '
                   f'fill="{colours[i % len(colours)]}"/>')
        label = f"{seconds:.2f} s"
        inside = bar > 70
        out.append(_svg_text(x + bar / 2 if inside else x + bar + 4, y + 14, label,
                             anchor="middle" if inside else "start",
                             fill="#ffffff" if inside else "#1f2328"))
        at += seconds
    end = left + width * total / span
    out.append(f'<line x1="{end:.1f}" y1="10" x2="{end:.1f}" y2="{axis_y}" stroke="#1f2328" '
               'stroke-width="2"/>')
    out.append(_svg_text(end, 10, f"RTO {format_duration(total)}", anchor="middle", size=11,
                         weight="bold"))
    if rto_target and rto_target <= 2 * total:
        gx = left + width * rto_target / span
        out.append(f'<line x1="{gx:.1f}" y1="14" x2="{gx:.1f}" y2="{axis_y}" stroke="{_RED}" '
                   'stroke-width="2" stroke-dasharray="5 3"/>')
        out.append(_svg_text(gx - 3, axis_y - 3, f"target {format_duration(rto_target)}",
                             anchor="end", size=11, fill=_RED))
    out.append("</svg>")
    if rto_target and rto_target > 2 * total:
        out.append(f'<p class="note">RTO target {format_duration(rto_target)}: beyond this '
                   "axis.</p>")
    return "".join(out)


def _window_html(report: DrillReport, data: dict[str, Any], cell: Any, head: Any,
                 time_cell: Any) -> list[str]:
    from html import escape

    window = report.window
    parts = ["<h2>Recoverable window: backups and archived WAL per timeline</h2>"]
    if window is None:
        return [*parts, '<p class="note">Not read (the drill ended before).</p>']
    doc = data["recoverable_window"]
    parts.append(_window_svg(report, window))
    timelines = sorted({r.timeline for r in window.wal})
    lines = []
    for timeline in timelines:
        ranges = [r for r in window.wal if r.timeline == timeline]
        gaps = len(ranges) - 1
        lines.append(f"timeline {timeline}: {sum(r.segments for r in ranges)} segments, "
                     f"{ranges[0].first} to {ranges[-1].last}, "
                     + ("continuous" if not gaps else f"{gaps} gap{'s' if gaps > 1 else ''}"))
    if window.backups:
        first, last = window.backups[0], window.backups[-1]
        lines.insert(0, f"{len(window.backups)} complete backup"
                     f"{'s' if len(window.backups) > 1 else ''}, taken "
                     f"{first.start_time.strftime('%Y-%m-%d %H:%M')} to "
                     f"{last.stop_time.strftime('%Y-%m-%d %H:%M')} UTC")
    if window.ranges_left_out:
        lines.append(f"{window.ranges_left_out} older WAL ranges left out")
    parts.append('<p class="note">' + "; ".join(escape(x) for x in lines) + ". WAL is placed "
                 "on the time axis by when each object was stored; between two ranges of one "
                 "timeline segments are missing (a gap: recovery stops there).</p>")
    parts += ['<table id="window-backups">',
              head("backup", "timeline", "start (UTC)", "stop (UTC)", "WAL from", "WAL to")]
    parts += [f'<tr data-backup="{escape(b["name"])}">{cell(b["name"])}{cell(b["timeline"])}'
              f'{time_cell(b["start_time"])}{time_cell(b["stop_time"])}{cell(b["start_wal"])}'
              f'{cell(b["stop_wal"])}</tr>' for b in doc["backups"]]
    parts += ["</table>", '<table id="window-wal">',
              head("timeline", "first segment", "last segment", "segments",
                   "first stored (UTC)", "last stored (UTC)")]
    parts += [f'<tr>{cell(r["timeline"])}{cell(r["first"])}{cell(r["last"])}'
              f'{cell(r["segments"])}{time_cell(r["first_stored"])}'
              f'{time_cell(r["last_stored"])}</tr>' for r in doc["wal"]]
    parts.append("</table>")
    return parts


_TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
               43200, 86400, 172800, 604800, 2592000)


def _window_svg(report: DrillReport, window: RecoverableWindow) -> str:
    """Backups and WAL ranges per timeline on a UTC time axis, with the drill's start and the
    last transaction it recovered."""
    from html import escape

    moments = [b.start_time for b in window.backups] + [b.stop_time for b in window.backups]
    moments += [t for r in window.wal for t in (r.first_stored, r.last_stored) if t]
    moments.append(report.started)
    if report.last_replayed_transaction:
        moments.append(report.last_replayed_transaction)
    low, high = min(moments), max(moments)
    span = max((high - low).total_seconds(), 1.0)
    low -= timedelta(seconds=span * 0.03)
    span *= 1.06
    timelines = sorted({r.timeline for r in window.wal})
    rows = ["backups"] + [f"WAL, timeline {t}" for t in timelines]
    left, width, row = 150, 720, 30
    axis_y = 28 + row * len(rows)
    out = [(f'<svg id="window-chart" xmlns="http://www.w3.org/2000/svg" width="900" '
            f'height="{axis_y + 34}" role="img" aria-label="recoverable window">')]

    def x_of(moment: datetime) -> float:
        return left + width * (moment - low).total_seconds() / span

    step = next((s for s in _TIME_STEPS if span / s <= 6), _TIME_STEPS[-1])
    fmt = "%H:%M:%S" if step < 60 else "%H:%M" if span < 86400 else "%m-%d %H:%M"
    epoch = low.timestamp()
    tick = datetime.fromtimestamp((epoch // step + 1) * step, timezone.utc)
    while tick < low + timedelta(seconds=span):
        x = x_of(tick)
        out.append(f'<line x1="{x:.1f}" y1="20" x2="{x:.1f}" y2="{axis_y}" stroke="#d0d7de"/>')
        out.append(_svg_text(x, axis_y + 15, tick.strftime(fmt), anchor="middle", size=11,
                             fill="#57606a"))
        tick += timedelta(seconds=step)
    out.append(_svg_text(left + width, axis_y + 30, "UTC", anchor="end", size=11,
                         fill="#57606a"))
    for i, name in enumerate(rows):
        out.append(_svg_text(4, 24 + i * row + 14, name))
    for b in window.backups:
        x = x_of(b.start_time)
        w = max(4.0, x_of(b.stop_time) - x)
        out.append(f'<rect x="{x:.1f}" y="24" width="{w:.1f}" height="18" fill="{_BLUE}">'
                   f"<title>{escape(b.name)}</title></rect>")
    for i, timeline in enumerate(timelines, 1):
        y = 24 + i * row
        ranges = [r for r in window.wal if r.timeline == timeline and r.first_stored]
        for r, after in zip(ranges, ranges[1:] + [None]):
            assert r.first_stored is not None and r.last_stored is not None
            x = x_of(r.first_stored)
            w = max(3.0, x_of(r.last_stored) - x)
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="18" '
                       f'fill="{_GREEN}"><title>{escape(r.first)} .. {escape(r.last)}</title></rect>')
            if after is not None and after.first_stored is not None:
                gx = x + w
                gw = max(3.0, x_of(after.first_stored) - gx)
                out.append(f'<rect x="{gx:.1f}" y="{y + 4}" width="{gw:.1f}" height="10" '
                           f'fill="{_RED}"><title>gap after {escape(r.last)}</title></rect>')
                out.append(_svg_text(gx + gw / 2, y - 2, "gap", anchor="middle", size=11,
                                     fill=_RED))
    marks = [(report.started, "drill started", "#1f2328", "")]
    if report.last_replayed_transaction:
        marks.insert(0, (report.last_replayed_transaction, "recovered to", _GREEN,
                         ' stroke-dasharray="5 3"'))
    for k, (moment, label, colour, dash) in enumerate(marks):
        x = x_of(moment)
        out.append(f'<line x1="{x:.1f}" y1="{8 + 10 * k}" x2="{x:.1f}" y2="{axis_y}" '
                   f'stroke="{colour}" stroke-width="2"{dash}/>')
        out.append(_svg_text(x - 3, 16 + 10 * k, label, anchor="end", size=11, fill=colour))
    out.append("</svg>")
    return "".join(out)


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
