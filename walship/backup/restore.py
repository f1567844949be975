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

No raw user text reaches PostgreSQL's configuration: :func:`make_target` refuses an empty
target, control characters and non-ASCII, a restore point name longer than PostgreSQL allows
(63 bytes), an xid that is not a plain decimal number and an LSN or time that does not parse;
the time and LSN are written in a normalised form; every value is quoted by PostgreSQL's rules
(:func:`quote_setting`); the comment header names only the backup and the kind of target.
(The drill reuses these functions.)
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
from walship.backup.fetch import FetchResult, check_directory, fetch_backup
from walship.backup.manifest import Manifest
from walship.backup.progress import Progress
from walship.errors import NotFound, UsageError, WalshipError

ACTIONS = ("pause", "promote", "shutdown")
KINDS = ("latest", "immediate", "time", "lsn", "xid", "name")
NAME_MAX_BYTES = 63  # a restore point name: MAXFNAMELEN - 1 in PostgreSQL's xlog_internal.h
XID_MAX = (1 << 64) - 1  # recovery_target_xid may be epoch-qualified (a 64-bit xid8)
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

    def __post_init__(self) -> None:
        # (the values a target writes are checked however it was built: make_target, a drill)
        if self.kind not in KINDS:
            raise UsageError(f"invalid recovery target kind {_shown(self.kind)}",
                             f"use one of {', '.join(KINDS)}")
        if self.kind == "xid":
            parse_xid(self.value)
        elif self.kind == "name":
            parse_name(self.value)
        elif self.kind == "time" and (self.time is None or self.time.tzinfo is None) \
                or self.kind == "lsn" and self.lsn is None:
            raise UsageError(f"recovery target {self.kind} without its parsed value (a time "
                             "needs a time zone)", hint="build targets with make_target")

    def describe(self) -> str:
        return self.kind if self.kind in ("latest", "immediate") else f"{self.kind}:{self.value}"

    def settings(self) -> dict[str, str]:
        """The recovery_target* settings (without the action and timeline)."""
        if self.kind == "time" and self.time is not None:
            utc = self.time.astimezone(timezone.utc)
            return {"recovery_target_time": f"{utc.year:04d}-"
                    + utc.strftime("%m-%d %H:%M:%S.%f+00")}
        if self.kind == "lsn":
            return {"recovery_target_lsn": str(self.lsn)}
        if self.kind == "xid":
            return {"recovery_target_xid": self.value}
        if self.kind == "name":
            return {"recovery_target_name": self.value}
        if self.kind == "immediate":
            return {"recovery_target": "immediate"}
        return {}


def _shown(value: str, limit: int = 80) -> str:
    """``value`` for an error line: quoted, every control or non-ASCII character escaped."""
    return ascii(value if len(value) <= limit else value[:limit] + "...")


def check_text(value: str, what: str, hint: str) -> str:
    """Refuse an empty ``value``, or one with a control character or a non-ASCII character
    (nothing of that kind belongs in a recovery target, and in postgresql.auto.conf a newline
    would end the setting); return it unchanged."""
    if not value:
        raise UsageError(f"empty {what}", "an empty value is no target at all", hint)
    for char in value:
        if not " " <= char <= "~":
            kind = "a control character" if char < " " or char == "\x7f" else \
                "a non-ASCII character"
            raise UsageError(f"invalid {what} {_shown(value)}",
                             f"it contains {kind} ({char!a}); only printable ASCII is "
                             "accepted", hint)
    return value


def parse_time(text: str) -> datetime:
    """An ISO 8601 / PostgreSQL timestamp with an explicit time zone."""
    hint = "write e.g. '2026-11-25 14:30:00+00' or 2026-11-25T14:30:00Z"
    cleaned = check_text(text, "target time", hint).strip().replace(" UTC", "+00:00")
    try:
        value = datetime.fromisoformat(cleaned)
    except ValueError:
        raise UsageError(f"invalid target time {_shown(text)}", hint=hint) from None
    if value.tzinfo is None:
        raise UsageError(f"target time {_shown(text)} has no time zone",
                         "a time without one would be read differently by walship and by "
                         "the server", "add one: +00, Z, +01:00...")
    try:
        value.astimezone(timezone.utc)
    except OverflowError:
        raise UsageError(f"invalid target time {_shown(text)}", "it is out of range",
                         hint) from None
    return value


def parse_xid(text: str) -> str:
    """A transaction id as PostgreSQL reads recovery_target_xid: a decimal number from 3 (the
    first normal xid) to 2^64-1 (epoch-qualified). No sign, no spaces, no leading zero
    (PostgreSQL would read 010 as octal) and no hexadecimal: refused rather than guessed."""
    hint = "a transaction id is a decimal number, e.g. 771 (see txid_current())"
    check_text(text, "target xid", hint)
    if not re.fullmatch(r"[1-9][0-9]{0,19}", text) or not 3 <= int(text) <= XID_MAX:
        raise UsageError(f"invalid target xid {_shown(text)}",
                         "not a decimal number from 3 to 2^64-1", hint)
    return text


def parse_name(text: str) -> str:
    """A restore point name (pg_create_restore_point): printable ASCII, at most 63 bytes."""
    hint = "the name given to pg_create_restore_point()"
    check_text(text, "target name", hint)
    if len(text.encode()) > NAME_MAX_BYTES:
        raise UsageError(f"invalid target name {_shown(text)}",
                         f"it has {len(text.encode())} bytes; PostgreSQL's restore point names "
                         f"have at most {NAME_MAX_BYTES}", hint)
    return text


def make_target(*, time: str | None = None, lsn: str | None = None, xid: str | None = None,
                name: str | None = None, immediate: bool = False) -> RecoveryTarget:
    """Build the target from the command line's options (at most one), every value checked
    (see the module docstring): an option given an empty value is refused, never ignored."""
    given = [k for k, v in (("time", time), ("lsn", lsn), ("xid", xid), ("name", name))
             if v is not None] + (["immediate"] if immediate else [])
    if len(given) > 1:
        raise UsageError("give at most one recovery target", f"got {', '.join(given)}",
                         "keep one of the --target options")
    if time is not None:
        return RecoveryTarget("time", time, time=parse_time(time))
    if lsn is not None:
        hint = "write e.g. 16/B374D848"
        check_text(lsn, "target LSN", hint)
        try:
            return RecoveryTarget("lsn", lsn, lsn=wal.Lsn.parse(lsn))
        except ValueError:
            raise UsageError(f"invalid target LSN {_shown(lsn)}", hint=hint) from None
    if xid is not None:
        return RecoveryTarget("xid", parse_xid(xid))
    if name is not None:
        return RecoveryTarget("name", parse_name(name))
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


def quote_setting(value: str) -> str:
    """A postgresql.conf string literal, by PostgreSQL's rules (guc-file.l): in single quotes,
    a quote doubled, a backslash escaped. A control character cannot be written (a newline
    would end the line): refused, as PostgreSQL's parser would reject it."""
    if any(char < " " or char == "\x7f" for char in value):
        raise UsageError(f"cannot write {_shown(value)} into postgresql.auto.conf",
                         "it contains a control character")
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def restore_command(command: list[str]) -> str:
    """restore_command running ``command``: shell-quoted words, every ``%`` in them doubled
    (PostgreSQL replaces %f, %p, %r and %% in it), then ``wal-fetch %f %p``."""
    return shlex.join(command).replace("%", "%%") + " wal-fetch %f %p"


def recovery_settings(target: RecoveryTarget, action: str, command: list[str]
                      ) -> dict[str, str]:
    """Every setting restore writes, as quoted postgresql.conf values."""
    if action not in ACTIONS:
        raise UsageError(f"invalid target action {_shown(action)}",
                         f"use one of {', '.join(ACTIONS)}")
    settings = {"restore_command": restore_command(command),
                **target.settings(), "recovery_target_timeline": "latest"}
    if target.kind != "latest":
        settings["recovery_target_action"] = action
    return {name: quote_setting(value) for name, value in settings.items()}


def _header(manifest: Manifest, target: RecoveryTarget) -> str:
    """The comment above the settings: the backup's name (printable ASCII only) and the kind
    of target, never a value the user typed."""
    name = "".join(char if "!" <= char <= "~" else "?" for char in manifest.name)
    return f"walship restore of backup {name}, target {target.kind}"


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
    check_directory(directory, force=force)  # before the repository is even asked
    if backup is not None:  # (an empty name is refused, not taken for "choose one")
        manifest = catalog.resolve(archive, backup)
    else:
        manifests = catalog.usable_chains(e.manifest for e in catalog.list_backups(archive)
                                          if e.manifest)
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
        settings["archive_mode"] = quote_setting("off")
    legacy = manifest.pg_major < 12
    signal = "recovery.conf" if legacy else ("standby.signal" if standby else "recovery.signal")

    def prepare(root: Path, write: Callable[[str, bytes], None]) -> None:
        for name in ("recovery.signal", "standby.signal", "recovery.conf"):
            try:
                os.unlink(root / name)
            except FileNotFoundError:
                pass
        header = _header(manifest, target)
        auto = root / "postgresql.auto.conf"
        text = auto.read_text() if auto.exists() else ""
        if legacy:
            recovery = dict(settings)
            archive = recovery.pop("archive_mode", None)
            if standby:
                recovery["standby_mode"] = quote_setting("on")
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
    return RestoreResult(result, target, signal, restore_command(command))
