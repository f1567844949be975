"""The drill's HTML page: parsed with the standard library, its figures are the JSON report's;
it is self-contained (nothing fetched); and, where Chromium is installed (always in CI), a
headless screenshot of it is taken and is not blank. (The page of a real drill is compared
with its JSON in tests/e2e/test_drill.py.)"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest

from walship import drill
from walship.drill.plan import format_duration
from walship.drill.report import PHASE_LABELS, recoverable_window

NOW = datetime(2026, 12, 6, 3, 0, tzinfo=timezone.utc)
CHROMIUM = Path("/usr/bin/chromium")


class _Page(HTMLParser):
    """Every table (by id) as rows of cells: (text, attributes); every element's tag and
    attributes; the ids of the SVG charts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[tuple[str, dict[str, str | None]]]]] = {}
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.row_attrs: dict[str, list[dict[str, str | None]]] = {}
        self.svgs: list[str] = []
        self.text: list[str] = []
        self._table: str | None = None
        self._cell: tuple[list[str], dict[str, str | None]] | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.elements.append((tag, attributes))
        if tag == "table":
            self._table = attributes.get("id") or f"table-{len(self.tables)}"
            self.tables[self._table] = []
            self.row_attrs[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
            self.row_attrs[self._table].append(attributes)
        elif tag in ("td", "th") and self._table:
            self._cell = ([], attributes)
        elif tag == "svg":
            self.svgs.append(attributes.get("id") or "")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell and self._table:
            self.tables[self._table][-1].append(("".join(self._cell[0]), self._cell[1]))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell[0].append(data)


def parse_page(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def _seconds(cell: tuple[str, dict[str, str | None]]) -> float | None:
    value = cell[1].get("data-seconds")
    return None if value is None else float(value)


def _time(cell: tuple[str, dict[str, str | None]]) -> str | None:
    """The ISO time a cell holds (data-time), after checking the text shown is that time."""
    value = cell[1].get("data-time")
    assert cell[0] == ("-" if value is None else value[:19].replace("T", " ")), cell
    return value


def html_figures(page: str) -> dict:
    """The figures of a drill's HTML page, in the JSON report's shape, each checked to be
    shown as the text the page displays."""
    parsed = parse_page(page)
    tables = parsed.tables
    drill_rows = {row[0][0]: row[1] for row in tables["drill"]}
    out: dict = {"backup": drill_rows["backup"][0], "target": drill_rows["recovery target"][0],
                 "started": _time(drill_rows["started (UTC)"]),
                 "finished": _time(drill_rows["finished (UTC)"]),
                 "next_drill_due": _time(drill_rows["next drill due (UTC)"]), "targets": {}}
    assert [c[0] for c in tables["objectives"][0]] == ["objective", "measured", "target",
                                                       "result"]
    for row in tables["objectives"][1:]:
        name, measured, target, result = row
        key = name[0].lower()
        out[f"{key}_seconds"] = _seconds(measured)
        out["targets"][f"{key}_seconds"] = _seconds(target)
        for cell in (measured, target):
            value = _seconds(cell)
            assert cell[0] == ("-" if value is None else format_duration(value)), cell
        out["targets"][f"{key}_met"] = {"met": True, "MISSED": False, "no target": None}[
            result[0]]
    out["phases"] = {}
    at = 0.0
    for row, attrs in zip(tables["phases"][1:], parsed.row_attrs["phases"][1:]):
        label, start, seconds = row
        name = attrs["data-phase"]
        assert label[0] == PHASE_LABELS.get(name, name)
        value = _seconds(seconds)
        assert seconds[0] == f"{value:.2f}" and abs(_seconds(start) - at) < 0.002, row
        out["phases"][name] = value
        at += value
    out["checks"] = []
    for row in tables["checks"][1:]:
        name, database, result, seconds, detail = row
        assert seconds[0] == f"{_seconds(seconds):.2f}"
        out["checks"].append({"name": name[0], "database": None if database[0] == "-"
                              else database[0], "passed": {"ok": True, "FAILED": False}[
                                  result[0]], "seconds": _seconds(seconds),
                              "detail": detail[0]})
    window = None
    if "window-backups" in tables:
        window = {"backups": [], "wal": []}
        for row in tables["window-backups"][1:]:
            name, timeline, start, stop, first, last = row
            window["backups"].append({"name": name[0], "timeline": int(timeline[0]),
                                      "start_time": _time(start), "stop_time": _time(stop),
                                      "start_wal": first[0], "stop_wal": last[0]})
        for row in tables["window-wal"][1:]:
            timeline, first, last, segments, first_stored, last_stored = row
            window["wal"].append({"timeline": int(timeline[0]), "first": first[0],
                                  "last": last[0], "segments": int(segments[0]),
                                  "first_stored": _time(first_stored),
                                  "last_stored": _time(last_stored)})
    out["recoverable_window"] = window
    out["charts"] = parsed.svgs
    return out


def json_figures(report: dict) -> dict:
    """The same figures from the JSON report."""
    window = report["recoverable_window"]
    return {"backup": report["backup"], "target": report["target"],
            "started": report["started"], "finished": report["finished"],
            "next_drill_due": report["next_drill_due"],
            "rto_seconds": report["rto_seconds"], "rpo_seconds": report["rpo_seconds"],
            "targets": report["targets"], "phases": report["phases"],
            "checks": [{k: c[k] for k in ("name", "database", "passed", "seconds", "detail")}
                       for c in report["checks"]],
            "recoverable_window": None if window is None else
            {"backups": window["backups"], "wal": window["wal"]}}


def assert_self_contained(page: str) -> None:
    """No script, and nothing the page would fetch: no external stylesheet, image, font or
    link (the SVG namespace is a name, not a fetch)."""
    parsed = parse_page(page)
    for tag, attrs in parsed.elements:
        assert tag not in ("script", "link", "img", "iframe", "object", "embed"), tag
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)
            if name in ("src", "href", "srcset"):
                pytest.fail(f"<{tag} {name}={value!r}>")
    assert "url(" not in page and "@import" not in page and "@font-face" not in page


def _manifest(name: str, start: datetime, start_wal: str, stop_wal: str, timeline: int = 1):
    class M:  # only what recoverable_window reads
        pass

    m = M()
    m.name, m.timeline, m.start_time, m.stop_time = name, timeline, start, \
        start + timedelta(minutes=4)
    m.start_wal, m.stop_wal = start_wal, stop_wal
    return m


def sample_report(**changes) -> drill.DrillReport:
    """A drill that missed its RTO target, with a failed check, two backups and WAL on two
    timelines, one of them with a gap."""
    report = drill.DrillReport(NOW, drill.DrillPlan(rto=25, rpo=300), "latest",
                               "20261205T010000Z")
    report.phases = {"backup_fetch": 12.5, "wal_replay_until_consistent": 6.25,
                     "until_recovery_end": 8.0, "first_query": 0.125}
    report.rto_seconds, report.rpo_seconds = 26.875, 42.0
    report.rpo_derivation = "drill start minus the last transaction recovered"
    report.last_replayed_transaction = NOW - timedelta(seconds=42)
    report.checks = [drill.CheckResult("accounts", "sql", True, 0.25, "returned '42'", "app"),
                     drill.CheckResult("no <orphans>", "sql", False, 1.5, "3 rows & more",
                                       "app"),
                     drill.CheckResult("data checksums", "checksums", True, 3.0, "ok")]
    report.finished = NOW + timedelta(seconds=40)
    size = 16 << 20
    base = NOW - timedelta(days=2)
    wal = []
    for n in list(range(0x10, 0x40)) + list(range(0x44, 0x80)):  # 40-43 missing: a gap
        wal.append((f"00000001000000000000{n:04X}"[-24:], (base + timedelta(minutes=n * 10))
                    .timestamp()))
    for n in range(0x7F, 0x90):
        wal.append((f"000000020000000000{n:06X}", (base + timedelta(minutes=n * 10 + 3))
                    .timestamp()))
    wal.append(("00000002.history", None))
    manifests = [_manifest("20261204T030000Z", base + timedelta(minutes=160),
                           "000000010000000000000010", "000000010000000000000011"),
                 _manifest("20261205T010000Z", base + timedelta(minutes=1200),
                           "000000010000000000000078", "000000010000000000000079")]
    report.window = recoverable_window(manifests, wal, size)
    for name, value in changes.items():
        setattr(report, name, value)
    return report


def test_the_window_is_runs_of_consecutive_segments_per_timeline():
    window = sample_report().window
    assert [(r.timeline, r.first, r.last, r.segments) for r in window.wal] == [
        (1, "000000010000000000000010", "00000001000000000000003F", 48),
        (1, "000000010000000000000044", "00000001000000000000007F", 60),
        (2, "00000002000000000000007F", "00000002000000000000008F", 17)]
    assert [b.name for b in window.backups] == ["20261204T030000Z", "20261205T010000Z"]


def test_html_figures_equal_the_json():
    report = sample_report()
    page = drill.html_report(report)
    figures = html_figures(page)
    assert figures.pop("charts") == ["objectives-chart", "phases-chart", "window-chart"]
    assert figures == json_figures(report.to_dict())
    assert figures["targets"]["rto_met"] is False and figures["phases"]["first_query"] == 0.125
    assert len(figures["recoverable_window"]["wal"]) == 3
    text = "".join(parse_page(page).text)
    assert "walship drill: FAILED" in text and "1 gap" in text and "timeline 2" in text
    assert_self_contained(page)
    # Escaped: a check's name cannot inject markup.
    assert "<orphans>" not in page and "&lt;orphans&gt;" in page


def test_html_without_a_window_or_targets():
    report = sample_report(window=None, plan=drill.DrillPlan(), checks=[], rto_seconds=None,
                           error="the restore failed: x", phases={"backup_fetch": 1.0})
    page = drill.html_report(report)
    figures = html_figures(page)
    figures.pop("charts")
    assert figures == json_figures(report.to_dict())
    assert figures["targets"] == {"rto_seconds": None, "rpo_seconds": None, "rto_met": None,
                                  "rpo_met": None}
    assert_self_contained(page)


# -- the page as a browser shows it -----------------------------------------------------------
def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of pixels as RGB(A) bytes) of an 8-bit RGB or RGBA PNG, decoded
    with zlib and struct (filters undone)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    assert header is not None
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = previous[i]
            corner = previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, rows


def screenshot(html: Path, png: Path, tmp_path: Path) -> None:
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", f"--screenshot={png}",
                    "--window-size=1200,1600", f"file://{html}"],
                   capture_output=True, timeout=120, check=True, cwd=tmp_path)


def test_a_screenshot_of_the_page_is_not_blank(tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing in CI (.ci/run installs chromium)")
        pytest.skip(f"{CHROMIUM} is not installed")
    html = tmp_path / "drill.html"
    html.write_text(drill.html_report(sample_report()))
    png = tmp_path / "drill.png"
    screenshot(html, png, tmp_path)
    keep = os.environ.get("WALSHIP_TEST_SCREENSHOT")  # to look at it: a path to copy it to
    if keep:
        shutil.copyfile(png, keep)
    width, height, rows = png_pixels(png.read_bytes())
    assert (width, height) == (1200, 1600)
    bpp = len(rows[0]) // width
    pixels = [row[i:i + 3] for row in rows[::4] for i in range(0, len(row), bpp * 4)]
    background = max(set(pixels), key=pixels.count)
    drawn = sum(p != background for p in pixels) / len(pixels)
    colours = set(pixels)
    # Text, tables and charts: many colours, a fair share of the page drawn on, and the
    # charts' red (the missed RTO and the WAL gap) and green (WAL ranges) among them.
    assert len(colours) > 50 and drawn > 0.04, (len(colours), drawn)

    def near(rgb: tuple[int, int, int]) -> bool:
        return any(all(abs(a - b) < 24 for a, b in zip(p, rgb)) for p in colours)
    assert near((0xCF, 0x22, 0x2E)) and near((0x1A, 0x7F, 0x37)) and near((0x09, 0x69, 0xDA))
