"""``restore``: prepare a data directory for point-in-time recovery from the repository.

It chooses the newest complete backup that precedes the recovery target (time: its stop time is
before the target; LSN: its stop LSN is at or before the target; xid, name, ``immediate`` or no
target: the newest backup), unless one is named. Before fetching anything it checks that the
WAL from the backup's start segment to its stop segment is in the archive, and refuses
otherwise. Then it fetches the backup (:mod:`walship.backup.fetch`) and, before the directory
becomes startable, writes ``recovery.signal`` (or ``standby.signal``) and the recovery settings
into ``postgresql.auto.conf``: ``restore_command`` running this walship's absolute path,
``recovery_target_timeline = 'latest'``, the target and its action. Recovery settings inherited
from the backed-up cluster are removed first. (PostgreSQL 10 and 11: ``recovery.conf``.)

The server finds the repository and key the way every ``wal-fetch`` does: in its environment
or the config file, never in postgresql.auto.conf (no secret is written there).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from walship import wal
from walship.archive import Archive
from walship.backup import catalog
from walship.backup.fetch import FetchResult, fetch_backup
from walship.backup.manifest import Manifest
from walship.backup.progress import Progress
from walship.errors import NotFound, UsageError, WalshipError

ACTIONS = ("pause", "promote", "shutdown")
MANAGED_SETTINGS = ("restore_command", "recovery_target", "recovery_target_time",
                    "recovery_target_lsn", "recovery_target_xid", "recovery_target_name",
                    "recovery_target_inclusive", "recovery_target_action",
                    "recovery_target_timeline")
_SETTING_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(?:=|\s|$)")


class WalMissing(WalshipError):
    """The archive lacks WAL a backup needs to become consistent: restoring it would fail."""


@dataclass(frozen=True)
class RecoveryTarget:
    """Where recovery stops: ``latest`` (all archived WAL), a time, LSN, xid, restore point
    name, or ``immediate`` (as soon as the backup is consistent)."""

    kind: str = "latest"
    value: str = ""
    time: datetime | None = None
    lsn: wal.Lsn | None = None

    def describe(self) -> str:
        return self.kind if self.kind in ("latest", "immediate") else f"{self.kind}:{self.value}"

    def settings(self) -> dict[str, str]:
        """The recovery_target* settings (without the action and timeline)."""
        if self.kind == "time" and self.time is not None:
            return {"recovery_target_time": self.time.astimezone(timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S.%f+00")}
        if self.kind == "lsn":
            return {"recovery_target_lsn": str(self.lsn)}
        if self.kind == "xid":
            return {"recovery_target_xid": self.value}
        if self.kind == "name":
            return {"recovery_target_name": self.value}
        if self.kind == "immediate":
            return {"recovery_target": "immediate"}
        return {}


def parse_time(text: str) -> datetime:
    """An ISO 8601 / PostgreSQL timestamp with an explicit time zone."""
    cleaned = text.strip().replace(" UTC", "+00:00")
    try:
        value = datetime.fromisoformat(cleaned)
    except ValueError:
        raise UsageError(f"invalid target time {text!r}", hint="write e.g. "
                         "'2026-11-25 14:30:00+00' or 2026-11-25T14:30:00Z") from None
    if value.tzinfo is None:
        raise UsageError(f"target time {text!r} has no time zone",
                         "a time without one would be read differently by walship and by "
                         "the server", "add one: +00, Z, +01:00...")
    return value


def make_target(*, time: str | None = None, lsn: str | None = None, xid: str | None = None,
                name: str | None = None, immediate: bool = False) -> RecoveryTarget:
    """Build the target from the command line's options (at most one)."""
    given = [k for k, v in (("time", time), ("lsn", lsn), ("xid", xid), ("name", name),
                            ("immediate", immediate)) if v]
    if len(given) > 1:
        raise UsageError("give at most one recovery target", f"got {', '.join(given)}")
    if time:
        return RecoveryTarget("time", time, time=parse_time(time))
    if lsn:
        try:
            return RecoveryTarget("lsn", lsn, lsn=wal.Lsn.parse(lsn))
        except ValueError:
            raise UsageError(f"invalid target LSN {lsn!r}", hint="write e.g. 16/B374D848"
                             ) from None
    if xid:
        if not xid.strip().isdigit():
            raise UsageError(f"invalid target xid {xid!r}", hint="a transaction id is a number")
        return RecoveryTarget("xid", xid.strip())
    if name:
        return RecoveryTarget("name", name)
    if immediate:
        return RecoveryTarget("immediate")
    return RecoveryTarget()


def choose_backup(manifests: list[Manifest], target: RecoveryTarget) -> Manifest:
    """The newest backup that precedes ``target`` (see the module docstring)."""
    newest_first = sorted(manifests, key=lambda m: (m.stop_time, m.stop_lsn), reverse=True)
    for manifest in newest_first:
        if target.kind == "time" and target.time is not None \
                and not manifest.stop_time < target.time:
            continue
        if target.kind == "lsn" and target.lsn is not None and not manifest.stop_lsn <= target.lsn:
            continue
        return manifest
    if not manifests:
        raise NotFound("the repository holds no complete backup",
                       hint="run walship backup-push first")
    raise NotFound(f"no complete backup precedes the target {target.describe()}",
                   f"the oldest ends at {newest_first[-1].stop_time.isoformat()} "
                   f"(LSN {newest_first[-1].stop_lsn})", "choose a later target")


def walship_command() -> list[str]:
    """The absolute command that runs this walship (for restore_command)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "walship":
        found = argv0 if os.sep in argv0 else shutil.which(argv0)
        if found and os.path.isfile(found):
            return [os.path.abspath(found)]
    sibling = Path(sys.executable).with_name("walship")
    if os.path.isabs(sys.executable) and sibling.is_file() and os.access(sibling, os.X_OK):
        return [str(sibling)]
    return [os.path.abspath(sys.executable), "-m", "walship"]


def _quote(value: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def recovery_settings(target: RecoveryTarget, action: str, command: list[str]
                      ) -> dict[str, str]:
    """Every setting restore writes, as quoted postgresql.conf values."""
    settings = {"restore_command": shlex.join(command) + " wal-fetch %f %p",
                **target.settings(), "recovery_target_timeline": "latest"}
    if target.kind != "latest":
        settings["recovery_target_action"] = action
    return {name: _quote(value) for name, value in settings.items()}


def rewrite_auto_conf(text: str, settings: Mapping[str, str], header: str,
                      extra_managed: tuple[str, ...] = ()) -> str:
    """``text`` without any recovery setting, then ``settings``."""
    managed = {name.lower() for name in (*MANAGED_SETTINGS, *extra_managed)}
    kept = []
    for line in text.splitlines():
        match = _SETTING_LINE.match(line)
        if match and match[1].lower() in managed:
            continue
        kept.append(line)
    block = [f"# {header}"] + [f"{name} = {value}" for name, value in settings.items()]
    return "\n".join([*kept, *block]) + "\n"


@dataclass(frozen=True)
class RestoreResult:
    fetch: FetchResult
    target: RecoveryTarget
    signal: str  # the file that starts recovery: recovery.signal, standby.signal, recovery.conf
    restore_command: str


def restore(archive: Archive, directory: str | os.PathLike[str], target: RecoveryTarget, *,
            action: str = "pause", standby: bool = False, backup: str | None = None,
            tablespace_map: Mapping[int, str] | None = None, force: bool = False,
            archive_mode_off: bool = False, parallel: int = 3,
            progress: Progress | None = None, command: list[str] | None = None,
            log: Callable[[str], None] | None = None) -> RestoreResult:
    """Fetch the right backup into ``directory`` and set it up to recover to ``target``."""
    if action not in ACTIONS:
        raise UsageError(f"invalid target action {action!r}", f"use one of {', '.join(ACTIONS)}")
    if backup:
        manifest = catalog.resolve(archive, backup)
    else:
        manifests = [e.manifest for e in catalog.list_backups(archive) if e.manifest]
        manifest = choose_backup(manifests, target)
    if target.kind == "time" and target.time is not None and manifest.stop_time >= target.time:
        raise UsageError(f"backup {manifest.name} ends after the target time",
                         f"it ends at {manifest.stop_time.isoformat()}",
                         "choose an older backup or a later target")
    if target.kind == "lsn" and target.lsn is not None and manifest.stop_lsn > target.lsn:
        raise UsageError(f"backup {manifest.name} ends after the target LSN",
                         f"it ends at {manifest.stop_lsn}", "choose an older backup")
    missing = catalog.WalIndex(archive).missing(manifest)
    if missing:
        raise WalMissing(f"backup {manifest.name} cannot be restored: the archive lacks WAL it "
                         "needs", f"missing {catalog.describe_missing(missing)} of "
                         f"{manifest.start_wal}..{manifest.stop_wal}",
                         "check archive_command; choose another backup with --backup NAME")
    command = command or walship_command()
    settings = recovery_settings(target, action, command)
    if archive_mode_off:
        settings["archive_mode"] = "off"
    legacy = manifest.pg_major < 12
    signal = "recovery.conf" if legacy else ("standby.signal" if standby else "recovery.signal")

    def prepare(root: Path, write: Callable[[str, bytes], None]) -> None:
        for name in ("recovery.signal", "standby.signal", "recovery.conf"):
            try:
                os.unlink(root / name)
            except FileNotFoundError:
                pass
        header = f"walship restore of backup {manifest.name}, target {target.describe()}"
        auto = root / "postgresql.auto.conf"
        text = auto.read_text() if auto.exists() else ""
        if legacy:
            recovery = dict(settings)
            archive = recovery.pop("archive_mode", None)
            if standby:
                recovery["standby_mode"] = "on"
            write("recovery.conf", rewrite_auto_conf("", recovery, header).encode())
            if archive:
                write("postgresql.auto.conf", rewrite_auto_conf(
                    text, {"archive_mode": archive}, header, ("archive_mode",)).encode())
        else:
            write("postgresql.auto.conf", rewrite_auto_conf(
                text, settings, header, ("archive_mode",) if archive_mode_off else ()
            ).encode())
            write(signal, b"")

    result = fetch_backup(archive, manifest.name, directory, tablespace_map=tablespace_map,
                          force=force, parallel=parallel, progress=progress,
                          manifest=manifest, prepare=prepare)
    return RestoreResult(result, target, signal, shlex.join(command) + " wal-fetch %f %p")
