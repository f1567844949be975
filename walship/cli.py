"""The command line: one thin click function per command over the archive core.

Commands parse arguments, build settings, call the core and log one line. Errors are turned
into exit statuses in exactly one place, :func:`run`, through :func:`walship.errors.exit_status`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from walship import logline
from walship.codec import DEFAULT_LEVEL
from walship.config import PRIMARY_NAME, Settings, load_settings
from walship.errors import (ExitStatus, NotFound, UsageError, WalshipError, exit_status,
                            standby_waits)


class _Finite(click.FloatRange):
    """A FloatRange that also refuses nan and infinity (nan passes every comparison)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def _print_version(ctx: click.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from walship.build_id import version_line

        click.echo(version_line())
        ctx.exit()


class _State:
    """What the group passes to its commands: the flags, resolved into settings on demand."""

    def __init__(self, flags: dict[str, Any], config_file: str | None,
                 started: float | None = None) -> None:
        self.flags = flags
        self.config_file = config_file
        self.started = time.monotonic() if started is None else started  # (the call's start)
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.flags, config_file=self.config_file)
            for warning in self._settings.warnings:
                logline.warning(warning)
        return self._settings

    def archive(self, deadline: float | None = None):  # noqa: ANN201 - walship.archive.Archive
        from walship.archive import open_archive

        return open_archive(self.settings, deadline)

    def archive_of(self, name: str | None):  # noqa: ANN201 - walship.archive.Archive
        """The archive, or with ``name`` (``--repo NAME``) that one repository alone."""
        archive = self.archive()
        if name is None:
            return archive
        members = getattr(archive.storage, "members", ())
        for member in members:
            if member.name == name:
                from walship.archive import Archive

                return Archive(member.storage, archive.codec)
        raise UsageError(f"no repository named {name!r}", "configured: " + (
            ", ".join(m.name for m in members) or "no [[mirrors]]"),
            "use --repo with primary or a mirror's name")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", metavar="URL", help="Repository: file:///path or "
              "azure://container[/prefix]. [env WALSHIP_REPO]")
@click.option("--config", "config_file", metavar="FILE", help="TOML config file. "
              "[env WALSHIP_CONFIG; default /etc/walship/walship.toml if present]")
@click.option("--encryption-key-file", metavar="FILE", help="Encrypt and authenticate with "
              "the key in FILE (see keygen). [env WALSHIP_ENCRYPTION_KEY_FILE]")
@click.option("--compression-level", type=int, metavar="N",
              help=f"zstd level, 1-22. [env WALSHIP_COMPRESSION_LEVEL; default {DEFAULT_LEVEL}]")
@click.option("--debug", is_flag=True, default=None, help="Tracebacks on errors. "
              "[env WALSHIP_LOG_LEVEL=debug]")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=lambda ctx, _param, value: _print_version(ctx, value),
              help="Show the version and the build id (of the sources it was built from).")
@click.pass_context
def cli(ctx: click.Context, repo: str | None, config_file: str | None,
        encryption_key_file: str | None, compression_level: int | None,
        debug: bool | None) -> None:
    """Ship PostgreSQL WAL and backups to Azure Blob Storage or a directory, and back.

    \b
    postgresql.conf:
      archive_command = 'walship wal-push %p'
      restore_command = 'walship wal-fetch %f %p'
    """
    flags = {"repo": repo, "encryption_key_file": encryption_key_file,
             "compression_level": compression_level,
             "log_level": "debug" if debug else None}
    ctx.obj = _State(flags, config_file, ctx.obj if isinstance(ctx.obj, float) else None)


def _verified(archive: Any, action: Any) -> Any:
    """``action(archive)``; with mirrors, again from each repository alone when what it read
    failed verification (:func:`walship.storage.mirrored.verified_read`)."""
    if not hasattr(archive.storage, "members"):
        return action(archive)
    from walship.storage.mirrored import verified_read

    return verified_read(archive, action)


@cli.command("wal-push")
@click.argument("path", metavar="PATH")
@click.pass_obj
def wal_push(state: _State, path: str) -> int:
    """Archive one WAL file (archive_command = 'walship wal-push %p').

    Exits 0 only once the file is durably stored. Pushing identical content again exits 0;
    different content under an existing name is refused (exit 3) and the stored copy kept;
    so is any file when the repository is written with another key (or none) or holds
    segments of another size (its marker, walship.json).
    """
    from walship.deadline import STOPPING_SECONDS, bounded, server_stopping
    from walship.pushahead import push

    state.settings.refuse_read_only_primary("push WAL into")
    seconds = state.settings.call_timeout
    if server_stopping():  # PostgreSQL's shutdown waits for the archiver's last calls
        seconds = min(seconds, STOPPING_SECONDS)
    with bounded(state.started, seconds) as deadline:
        logline.transfer(push(state.archive(deadline), state.settings, path, deadline))
    return ExitStatus.OK


@cli.command("wal-fetch")
@click.argument("name", metavar="NAME")
@click.argument("destination", metavar="DEST")
@click.pass_obj
def wal_fetch(state: _State, name: str, destination: str) -> int:
    """Restore one WAL file (restore_command = 'walship wal-fetch %f %p').

    Exits 0 once DEST holds the complete, verified file; 1 only when the repository says the
    file does not exist; 126 or more on any other failure, so that PostgreSQL stops recovery
    instead of ending it early. In a standby (standby.signal in the working directory) an
    unreachable or missing repository exits 1 too, with a warning: not available yet.
    """
    from walship.archive import check_destination
    from walship.deadline import bounded
    from walship.prefetch import fetch

    check_destination(destination)  # before the prefetch cache beside it is touched
    try:
        with bounded(state.started, state.settings.call_timeout) as deadline:
            result = fetch(state.archive(deadline), state.settings, name, destination, deadline)
    except NotFound:
        logline.info(f"wal-fetch {name} not found in the archive")
        return ExitStatus.NOT_FOUND
    logline.transfer(result)
    return ExitStatus.OK


@cli.command("keygen")
@click.option("--output", "-o", metavar="FILE", help="Write the key into FILE, a new file "
              "of mode 0600 (an existing FILE is never overwritten), instead of stdout.")
def keygen(output: str | None) -> int:
    """Make a new random encryption key: into a new private FILE (--output), or on stdout."""
    from walship.codec.keys import EncryptionKey

    text = EncryptionKey.generate().to_text()
    if output is not None:
        _write_new_private_file(output, text.encode())
        owner = (f"; it belongs to root: chown it to PostgreSQL's user (chown postgres "
                 f"{output})" if os.geteuid() == 0 else "")
        logline.info(f"keygen wrote a new key into {output} (mode 0600){owner}; keep a copy "
                     "elsewhere: nothing encrypted with it can be read without it")
        return ExitStatus.OK
    stream = sys.stdout
    if stream is None:  # started with stdout closed (walship keygen >&-)
        raise UsageError("cannot write the key", "standard output is closed",
                         "walship keygen --output FILE")
    if stream.isatty():
        logline.info("this is a secret key: write it into a file, e.g. "
                     "walship keygen --output /etc/walship/key")
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError) as error:  # a full disk, a closed pipe
        why = os.strerror(error.errno) if getattr(error, "errno", None) else str(error)
        raise UsageError("cannot write the key to standard output", why,
                         "walship keygen --output FILE") from None
    return ExitStatus.OK


def _write_new_private_file(path: str, data: bytes) -> None:
    """Create ``path`` (never an existing file, nor through a symlink) with mode 0600, holding
    ``data``, synced to disk; on failure nothing of it is left behind."""
    import errno

    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} already exists", "keygen never overwrites a file (it may "
                         "hold the key your archive needs)", "choose a new file name") from None
    except OSError as error:
        hint = ("create the directory first" if error.errno == errno.ENOENT
                else "check the directory's owner and permissions")
        raise UsageError(f"cannot create {path}", os.strerror(error.errno or 0), hint) from None
    try:
        created = os.fstat(fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as error:
        os.close(fd)
        try:  # remove what this call created, and only that
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) == (created.st_dev, created.st_ino):
                os.unlink(path)
        except OSError:
            pass
        raise UsageError(f"cannot write the key into {path}", os.strerror(error.errno or 0),
                         "free space or choose another file system") from None
    os.close(fd)


@cli.command("check")
@click.pass_obj
def check(state: _State) -> int:
    """Validate the configuration, reach the repository, print the effective settings."""
    settings = state.settings
    click.echo(f"config file: {settings.config_file or '-'}")
    for name, value, source in settings.describe():
        click.echo(f"{name:28} {value:40} {source}")
    if settings.encryption_key_file:
        from walship.codec.keys import load_key_file

        key = load_key_file(settings.encryption_key_file)
        click.echo(f"encryption: AES-256-GCM, key id {key.key_id.hex()}")
    else:
        click.echo("encryption: off (set WALSHIP_ENCRYPTION_KEY_FILE to encrypt)")
    if settings.drill:
        from walship.drill import describe_plan, parse_plan

        click.echo("drill: " + describe_plan(parse_plan(settings.drill,
                                                        f"config file {settings.config_file}")))
    archive = state.archive()
    from walship import layout

    count = sum(1 for _ in archive.storage.list(layout.WAL_PREFIX, limit=1000))
    click.echo(f"repository {archive.storage.url}: reachable, "
               f"{count if count < 1000 else '1000+'} WAL files")
    transport = getattr(archive.storage, "transport", None)
    if transport:
        click.echo(f"transport: {transport}")
    from walship.repository import describe

    status = ExitStatus.OK
    for member in getattr(archive.storage, "members", ()):  # with mirrors: each one
        try:
            count = sum(1 for _ in member.storage.list(layout.WAL_PREFIX, limit=1000))
        except WalshipError as error:
            click.echo(f"repository {member.name} ({member.mode}): UNREACHABLE: "
                       f"{error.one_line()}")
            status = ExitStatus.UNAVAILABLE
            continue
        click.echo(f"repository {member.name} ({member.mode}) {member.storage.url}: "
                   f"reachable, {count if count < 1000 else '1000+'} WAL files")
    marker = archive.guard.read_marker()
    if marker is None:
        click.echo("marker: none yet" + (" (a read-only repository: never written here)"
                                          if settings.read_only_primary else
                                          " (the next push writes walship.json)"))
    else:
        agrees = marker.key_id == archive.guard.key_id
        click.echo(f"marker: {describe(marker.key_id)}, WAL segments of "
                   f"{marker.segment_size} bytes" + ("" if agrees else
                                                     " (the configured key DIFFERS: pushes "
                                                     "are refused)"))
        if not agrees:
            status = ExitStatus.CONFLICT
    from walship.entry import installed_launcher

    click.echo(f"launcher: {installed_launcher()}")
    return status


@cli.command("demo")
@click.option("--keep", is_flag=True, help="Keep the temporary directory for inspection.")
@click.option("--segments", default=4, show_default=True, help="WAL segments to generate.")
def demo(keep: bool, segments: int) -> int:
    """Archive and restore a throwaway PostgreSQL cluster through a file:// repository."""
    from walship.commands.demo import run_demo

    return run_demo(keep=keep, segments=segments)


@cli.command("backup-push")
@click.option("--dbname", "-d", metavar="CONNINFO", help="Database to connect to: a name, "
              "a key=value string or a URI. [default: libpq's PG* environment]")
@click.option("--part-size", type=click.IntRange(1, 4096), default=64, show_default=True,
              metavar="MIB", help="Target plaintext size of one part.")
@click.option("--checkpoint", type=click.Choice(["fast", "spread"]), default="fast",
              show_default=True, help="Start at once, or spread the starting checkpoint.")
@click.option("--wal-timeout", type=_Finite(0, 86400), default=60.0, show_default=True,
              metavar="SECONDS", help="How long to wait for the WAL the backup needs to "
              "reach the repository before writing the manifest anyway (with a warning).")
@click.option("--type", "backup_type", type=click.Choice(["full", "diff", "incr"]),
              default=None, help="full; diff: store what changed since the newest full "
              "backup; incr: since the newest backup. [default: backup_type, else full]")
@click.pass_obj
def backup_push(state: _State, dbname: str | None, part_size: int, checkpoint: str,
                wal_timeout: float, backup_type: str | None) -> int:
    """Take an online base backup of the local server into the repository.

    Run it on the database server as its OS user (it reads the data directory), e.g. daily
    from cron: 0 2 * * * postgres walship backup-push
    """
    from walship.backup.progress import for_stderr
    from walship.backup.push import push_backup
    from walship.backup.source import PostgresSource

    state.settings.refuse_read_only_primary("back up into")
    archive = state.archive()
    result = push_backup(archive, PostgresSource(dbname, log=logline.info),
                         parallel=state.settings.parallel, part_size=part_size << 20,
                         fast=checkpoint == "fast", progress=for_stderr("backup-push"),
                         log=logline.info, wal_timeout=wal_timeout,
                         backup_type=backup_type or state.settings.backup_type)
    manifest = result.manifest
    logline.info(f"backup-push {manifest.name} stored in={result.bytes_in} "
                 f"out={result.bytes_out} seconds={result.seconds:.3f} "
                 f"files={len(manifest.files)} parts={len(manifest.parts)} "
                 f"type={manifest.backup_type} parent={manifest.parent or '-'} "
                 f"unchanged={result.referenced} block_deltas={result.deltas}")
    return ExitStatus.OK


def _size(n: object) -> str:
    value = float(n)  # type: ignore[arg-type]
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


@cli.command("backup-list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, every detail.")
@click.option("--repo", "repo_name", metavar="NAME", help="With mirrors: this repository "
              "alone (primary or a mirror's name). [default: all, falling over]")
@click.pass_obj
def backup_list(state: _State, as_json: bool, repo_name: str | None) -> int:
    """List the backups, oldest first, and whether the WAL each one needs is archived.

    A backup is usable when it is complete (its manifest was written), the WAL from its
    start to its stop segment is in the archive and, for a diff or incr backup, every backup
    it depends on is complete. SIZE is what a restore writes, STORED what the backup's own
    parts take.
    """
    import json

    from walship.backup import catalog

    archive = state.archive_of(repo_name)
    index = catalog.WalIndex(archive)
    entries = catalog.list_backups(archive)
    others = {e.name: e.manifest for e in entries if e.manifest is not None}
    rows = [catalog.summary(entry, index, others) for entry in entries]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return ExitStatus.OK
    header = ("NAME", "TYPE", "PARENT", "START (UTC)", "START LSN", "STOP LSN", "TL", "SIZE",
              "STORED", "SECONDS", "WAL")
    table = [header]
    for row in rows:
        if not row["complete"]:
            table.append((str(row["name"]), "-", "-", "-", "-", "-", "-", "-",
                          _size(row["stored_size"]), "-",
                          "INCOMPLETE (no manifest, never used)"))
            continue
        table.append((str(row["name"]), str(row["type"]), str(row["parent"] or "-"),
                      str(row["start_time"])[:19].replace("T", " "),
                      str(row["start_lsn"]), str(row["stop_lsn"]), str(row["timeline"]),
                      _size(row["logical_bytes"]), _size(row["stored_bytes"]),
                      f"{row['duration']:.1f}",
                      f"CHAIN BROKEN ({row['chain_problem']}), never used"
                      if not row["chain_complete"] else
                      "complete" if row["wal_complete"] else
                      f"MISSING {len(row['wal_missing'])}+ (from {row['wal_missing'][0]})"))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return ExitStatus.OK


def _tablespace_map(values: tuple[str, ...]) -> dict[int, str]:
    from walship.backup.fetch import parse_tablespace_mapping

    return parse_tablespace_mapping(values)


@cli.command("backup-fetch")
@click.argument("name", metavar="NAME|LATEST")
@click.argument("directory", metavar="DIR")
@click.option("--tablespace-map", "mappings", multiple=True, metavar="OID=PATH",
              help="Restore tablespace OID to PATH instead of its original location.")
@click.option("--force", is_flag=True, help="Replace the content of DIR, if it is a "
              "PostgreSQL data directory (PG_VERSION, global/) or an interrupted fetch.")
@click.pass_obj
def backup_fetch(state: _State, name: str, directory: str, mappings: tuple[str, ...],
                 force: bool) -> int:
    """Download a backup into DIR, every file checked against its manifest.

    Nothing PostgreSQL could start on is left behind if any check fails. For point-in-time
    recovery use restore, which also writes the recovery settings.
    """
    from walship.backup.fetch import check_directory, fetch_backup
    from walship.backup.progress import for_stderr

    tablespace_map = _tablespace_map(mappings)
    check_directory(directory, force=force)  # input errors before the repository is opened
    result = _verified(state.archive(), lambda archive: fetch_backup(
        archive, name, directory, tablespace_map=tablespace_map, force=force,
        parallel=state.settings.parallel, progress=for_stderr("backup-fetch")))
    logline.info(f"backup-fetch {result.manifest.name} delivered in={result.bytes_in} "
                 f"out={result.bytes_out} seconds={result.seconds:.3f} "
                 f"files={len(result.manifest.files)} parts={len(result.manifest.parts)} "
                 f"into {result.directory}")
    return ExitStatus.OK


@cli.command("restore")
@click.argument("directory", metavar="DIR")
@click.option("--target-time", metavar="TIME", help="Stop before the first commit after "
              "TIME (with a time zone: '2026-11-25 14:30:00+00').")
@click.option("--target-lsn", metavar="LSN", help="Stop at this WAL position.")
@click.option("--target-xid", metavar="XID", help="Stop after this transaction.")
@click.option("--target-name", metavar="NAME", help="Stop at this restore point "
              "(pg_create_restore_point).")
@click.option("--target", "target_kind", type=click.Choice(["immediate"]),
              help="immediate: stop as soon as the backup is consistent.")
@click.option("--target-action", type=click.Choice(["pause", "promote", "shutdown"]),
              default="pause", show_default=True, help="What the server does at the target.")
@click.option("--standby", is_flag=True, help="Start as a standby (standby.signal).")
@click.option("--backup", metavar="NAME", help="Use this backup instead of choosing one.")
@click.option("--tablespace-map", "mappings", multiple=True, metavar="OID=PATH",
              help="Restore tablespace OID to PATH instead of its original location.")
@click.option("--force", is_flag=True, help="Replace the content of DIR, if it is a "
              "PostgreSQL data directory (PG_VERSION, global/) or an interrupted fetch.")
@click.option("--archive-mode", type=click.Choice(["preserve", "off"]), default="preserve",
              show_default=True, help="off: the restored server does not archive (keeps it "
              "from writing a new timeline into this repository).")
@click.pass_obj
def restore(state: _State, directory: str, target_time: str | None, target_lsn: str | None,
            target_xid: str | None, target_name: str | None, target_kind: str | None,
            target_action: str, standby: bool, backup: str | None,
            mappings: tuple[str, ...], force: bool, archive_mode: str) -> int:
    """Prepare DIR for point-in-time recovery: the newest backup before the target, its WAL
    checked in the archive, recovery settings written. Then start the server on DIR.

    Without a target, recovery replays all archived WAL. The server runs
    'walship wal-fetch %f %p' and finds the repository like any wal-fetch: in its
    environment or the config file.
    """
    from walship.backup.fetch import check_directory
    from walship.backup.progress import for_stderr
    from walship.backup.restore import make_target
    from walship.backup.restore import restore as run_restore

    target = make_target(time=target_time, lsn=target_lsn, xid=target_xid, name=target_name,
                         immediate=target_kind == "immediate")
    tablespace_map = _tablespace_map(mappings)
    check_directory(directory, force=force)  # input errors before the repository is opened
    result = _verified(state.archive(), lambda archive: run_restore(
        archive, directory, target, action=target_action, standby=standby, backup=backup,
        tablespace_map=tablespace_map, force=force, archive_mode_off=archive_mode == "off",
        parallel=state.settings.parallel, progress=for_stderr("restore")))
    fetched = result.fetch
    logline.info(f"restore {fetched.manifest.name} delivered in={fetched.bytes_in} "
                 f"out={fetched.bytes_out} seconds={fetched.seconds:.3f} into "
                 f"{fetched.directory} target={result.target.describe()} "
                 f"signal={result.signal}; start the server to recover")
    return ExitStatus.OK


@cli.command("delete")
@click.option("--retain-full", type=click.IntRange(min=1), metavar="N",
              help="Keep the newest N complete backups.")
@click.option("--retain-days", type=_Finite(0, 36500), metavar="D",
              help="Keep every point of the last D days restorable: the backups stopping "
              "within them and the newest one before.")
@click.option("--before", "before", metavar="NAME|TIME", help="Delete complete backups "
              "older than backup NAME, or than TIME (every point from TIME on stays "
              "restorable).")
@click.option("--incomplete-grace", type=_Finite(0, 876000), default=24.0,
              show_default=True, metavar="HOURS", help="An incomplete backup written to "
              "within HOURS may be in progress: never deleted, and its WAL kept.")
@click.option("--confirm", is_flag=True, help="Delete. Without it: a dry run that lists "
              "what would go.")
@click.option("--json", "as_json", is_flag=True, help="The plan as JSON on stdout.")
@click.option("--repo", "repositories", metavar="NAME", multiple=True, help="With mirrors: "
              "delete only from this repository (repeatable). [default: every one but the "
              "read-only]")
@click.pass_obj
def delete(state: _State, retain_full: int | None, retain_days: float | None,
           before: str | None, incomplete_grace: float, confirm: bool, as_json: bool,
           repositories: tuple[str, ...]) -> int:
    """Delete old backups and the WAL no retained backup needs (dry run unless --confirm).

    A backup is kept if ANY rule keeps it; the newest complete backup always is. WAL older
    than the oldest retained backup's start goes; timeline history files never do.
    """
    import json
    from datetime import timedelta

    from walship import prune
    from walship.retention import Policy

    if not repositories or PRIMARY_NAME in repositories:
        state.settings.refuse_read_only_primary("delete from")
    policy = Policy(retain_full=retain_full, retain_days=retain_days,
                    incomplete_grace=timedelta(hours=incomplete_grace),
                    **_before(before))
    policy.check()
    archive = state.archive()
    if repositories:  # (decided on what every repository holds, applied to these only)
        members = getattr(archive.storage, "members", ())
        names = [m.name for m in members]
        unknown = [n for n in repositories if n not in names]
        if not members or unknown:
            raise UsageError(f"no repository named {(unknown or list(repositories))[0]!r}",
                             "configured: " + (", ".join(names) or "no [[mirrors]]"),
                             "use --repo with a mirror's name, or primary")
        _refuse_read_only(state.settings, archive.storage, repositories, "delete from")
        archive.storage.delete_only = frozenset(repositories)
    plan = prune.make_plan(archive, policy)
    if as_json:
        click.echo(json.dumps({**prune.describe(plan), "dry_run": not confirm}, indent=2))
    else:
        for kept in plan.kept:
            click.echo(f"keep    backup {kept.name}: {'; '.join(kept.reasons)}")
        for backup in plan.delete_backups:
            state_text = "complete" if backup.complete else "incomplete"
            click.echo(f"delete  backup {backup.name} ({state_text}) "
                       f"{_size(backup.stored_bytes)}")
        if plan.delete_wal:
            first, last = plan.delete_wal[0].key[4:], plan.delete_wal[-1].key[4:]
            click.echo(f"delete  {len(plan.delete_wal)} WAL files {first} .. {last} "
                       f"{_size(plan.wal_bytes)}")
        for note in plan.notes:
            click.echo(f"note    {note}")
        click.echo(f"{'deleting' if confirm else 'would delete'} "
                   f"{len(plan.delete_backups)} backups and {len(plan.delete_wal)} WAL files, "
                   f"{_size(plan.total_bytes)}; keeping {len(plan.retained)} complete "
                   f"backups and {plan.kept_wal} WAL files"
                   + ("" if confirm else " (dry run: add --confirm to delete)"))
    if not confirm:
        return ExitStatus.OK
    result = prune.execute(archive, plan, log=logline.info)
    logline.info(f"delete done backups={result.backups} wal={result.wal_files} "
                 f"bytes={result.bytes} seconds={result.seconds:.3f}")
    return ExitStatus.OK


def _before(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    from walship.backup import layout

    if layout.is_backup_name(value):
        return {"before_name": value}
    from datetime import datetime, timezone

    from walship.backup.restore import parse_time

    when = parse_time(value)
    if when > datetime.now(timezone.utc):
        raise UsageError(f"--before {value!r} is in the future", "every point from that time on "
                         "would be kept restorable, that is none: all but the newest backup "
                         "would go", "give a past time, with its time zone, or a backup name")
    return {"before_time": when}


@cli.command("wal-verify")
@click.option("--deep", is_flag=True, help="Also decode every WAL object (digest, "
              "authentication, size), writing nothing.")
@click.option("--wal-segment-size", type=int, default=16, show_default=True, metavar="MIB",
              help="Segment size when no backup manifest says it.")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON on stdout.")
@click.option("--repo", "repo_name", metavar="NAME", help="With mirrors: this repository "
              "alone (primary or a mirror's name). [default: all, falling over]")
@click.pass_obj
def wal_verify(state: _State, deep: bool, wal_segment_size: int, as_json: bool,
               repo_name: str | None) -> int:
    """Check that the archived WAL is continuous from the oldest backup to the newest segment
    on every timeline, that timeline history files are consistent and (--deep) intact.

    Exits 0 when all is well, 7 on a gap or a history problem, 5 on a damaged object.
    """
    import json

    from walship.errors import ArchiveIncomplete, IntegrityError
    from walship.verify import report_dict, verify_wal

    if wal_segment_size not in [1 << n for n in range(11)]:
        raise UsageError(f"invalid --wal-segment-size {wal_segment_size}",
                         "a WAL segment size is a power of two from 1 to 1024 MiB",
                         "PostgreSQL's default is 16 (see initdb --wal-segsize)")
    report = verify_wal(state.archive_of(repo_name), segment_size=wal_segment_size << 20,
                        deep=deep, parallel=state.settings.parallel)
    if as_json:
        click.echo(json.dumps(report_dict(report), indent=2))
    else:
        click.echo(f"segment size {report.segment_size >> 20} MiB (from "
                   f"{report.segment_size_from}); oldest complete backup: "
                   f"{report.oldest_backup or 'none'}; {report.objects} WAL objects"
                   + (f", {_size(report.decoded_bytes)} decoded" if deep else ""))
        for t in report.timelines:
            parents = "->".join(map(str, (*t.parents, t.timeline)))
            click.echo(f"timeline {t.timeline} ({parents}): {t.segments} segments "
                       f"{t.first or '-'} .. {t.last or '-'}, {_size(t.bytes)}, checked from "
                       f"{t.checked_from or '-'}: "
                       + ("complete" if not t.gaps else f"MISSING {t.missing}"))
            for gap in t.gaps:
                click.echo(f"  gap {gap.first} .. {gap.last} ({gap.count} segments)")
            for problem in t.problems:
                click.echo(f"  history: {problem}")
        for damage in report.damaged:
            click.echo(f"DAMAGED {damage.name}: {damage.why}")
        for note in report.notes:
            click.echo(f"note: {note}")
    if report.damaged:
        raise IntegrityError(f"wal-verify found {len(report.damaged)} damaged objects",
                             f"e.g. {report.damaged[0].name}: {report.damaged[0].why}",
                             "restore them from another copy; a restore would stop there")
    if report.gaps or report.problems:
        raise ArchiveIncomplete(f"wal-verify found {report.gaps} missing segments and "
                                f"{report.problems} history problems", "a restore through a "
                                "gap stops at it", "see the report above; take a new "
                                "backup-push to restart a continuous range")
    logline.info(f"wal-verify ok objects={report.objects}"
                 + (f" decoded={report.decoded_bytes}" if deep else ""))
    return ExitStatus.OK


@cli.command("backup-verify")
@click.argument("name", metavar="NAME|LATEST")
@click.option("--json", "as_json", is_flag=True, help="The result as JSON on stdout.")
@click.option("--repo", "repo_name", metavar="NAME", help="With mirrors: this repository "
              "alone (primary or a mirror's name). [default: all, falling over]")
@click.pass_obj
def backup_verify(state: _State, name: str, as_json: bool, repo_name: str | None) -> int:
    """Check a backup without restoring it: every part decoded, every file's SHA-256 and size
    against the manifest, and the WAL it needs present in the archive.

    Exits 0 when restorable, 5 on damage, 7 when WAL it needs is missing.
    """
    import json

    from walship.backup.progress import for_stderr
    from walship.backup.verify import verify_backup
    from walship.errors import ArchiveIncomplete

    result = _verified(state.archive_of(repo_name), lambda archive: verify_backup(
        archive, name, parallel=state.settings.parallel, progress=for_stderr("backup-verify")))
    manifest = result.manifest
    if as_json:
        click.echo(json.dumps({"name": manifest.name, "files": len(manifest.files),
                               "parts": len(manifest.parts), "file_bytes": result.file_bytes,
                               "stored_bytes": result.stored_bytes,
                               "wal_missing": list(result.wal_missing),
                               "restorable": result.restorable}, indent=2))
    logline.info(f"backup-verify {manifest.name} files ok in={result.stored_bytes} "
                 f"out={result.file_bytes} seconds={result.seconds:.3f} "
                 f"files={len(manifest.files)} parts={len(manifest.parts)}")
    if result.wal_missing:
        from walship.backup.catalog import describe_missing

        raise ArchiveIncomplete(f"backup {manifest.name} cannot be restored: the archive "
                                f"lacks WAL it needs", f"missing "
                                f"{describe_missing(result.wal_missing)}",
                                "wait for archiving to catch up, or use another backup")
    return ExitStatus.OK


def _refuse_read_only(settings: Settings, storage: Any, names: tuple[str, ...],
                      action: str) -> None:
    """A UsageError when one of ``names`` is a read-only (``mode = "read"``) repository, or
    the primary when it is an account's secondary endpoint."""
    for name in names:
        if name == PRIMARY_NAME:
            settings.refuse_read_only_primary(action)
        elif storage.member(name).mode == "read":
            raise UsageError(f"cannot {action} repository {name}", 'it is read-only (mode = '
                             '"read"): walship never writes it (an account\'s secondary '
                             "endpoint is written by Azure's geo-replication alone)",
                             "name the primary, a sync or an async mirror")


@cli.command("repo-sync")
@click.option("--from", "source", metavar="NAME", default="primary", show_default=True,
              help="The repository to copy from (primary or a mirror's name).")
@click.option("--to", "targets", metavar="NAME", multiple=True, help="A repository to copy "
              "into (repeatable). [default: every other one but the read-only]")
@click.option("--dry-run", is_flag=True, help="Only say what would be copied.")
@click.option("--json", "as_json", is_flag=True, help="The result as JSON on stdout.")
@click.pass_obj
def repo_sync(state: _State, source: str, targets: tuple[str, ...], dry_run: bool,
              as_json: bool) -> int:
    """Copy what one repository holds and another lacks: WAL, history files and complete
    backups (parts first, manifest last), as stored, verified on the way.

    Keeps async mirrors current (run it from a timer) and seeds a new mirror. Idempotent:
    safe to kill and run again, beside archiving and delete. Never deletes anything.
    """
    import json

    from walship import reposync
    from walship.backup.progress import for_stderr

    archive = state.archive()
    members = getattr(archive.storage, "members", None)
    if not members or len(members) < 2:  # (a read-only primary alone is one member)
        raise UsageError("repo-sync needs mirrors", "no [[mirrors]] are configured",
                         "name them in the config file (see the README's Mirrors section)")
    names = [m.name for m in members]
    for name in (source, *targets):
        if name not in names:
            raise UsageError(f"no repository named {name!r}", "configured: "
                             + ", ".join(names), "use --from/--to with one of those names")
    origin = archive.storage.member(source)
    _refuse_read_only(state.settings, archive.storage, targets, "repo-sync into")
    chosen = [archive.storage.member(n) for n in targets] if targets else \
        [m for m in members if m.name != source and m.mode != "read"]
    if not targets:
        for member in members:
            if member.mode == "read" and member.name != source:
                logline.info(f"repo-sync {source} -> {member.name}: skipped, it is read-only "
                             + ("(an account's secondary endpoint)" if member.name ==
                                PRIMARY_NAME else '(mode = "read")'))
    reports: list[dict[str, Any]] = []
    first_error: BaseException | None = None
    for target in chosen:
        if target.name == source:
            continue
        report: dict[str, Any] = {"from": source, "to": target.name}
        try:
            work = reposync.plan(origin.storage, target.storage)
            report.update(missing=len(work.objects), missing_bytes=work.bytes,
                          lag_seconds=round(work.lag_seconds(), 3))
            if dry_run:
                report["keys"] = [info.key for info in work.objects]
                logline.info(f"repo-sync {source} -> {target.name} would copy "
                             f"{len(work.objects)} objects ({work.bytes} bytes)")
            else:
                result = reposync.sync(origin.storage, target.storage, source_name=source,
                                       destination_name=target.name, codec=archive.codec,
                                       progress=for_stderr(f"repo-sync {target.name}"),
                                       work=work)
                report.update(copied=result.copied, bytes=result.bytes,
                              already=result.already, vanished=result.vanished,
                              seconds=round(result.seconds, 3))
                report["damaged"] = result.damaged
                logline.info(f"repo-sync {source} -> {target.name} copied={result.copied} "
                             f"bytes={result.bytes} already={result.already} "
                             f"vanished={len(result.vanished)} "
                             f"seconds={result.seconds:.3f}")
                if result.damaged:
                    from walship.errors import IntegrityError

                    raise IntegrityError(f"{len(result.damaged)} objects of repository "
                                         f"{source} failed verification and were not copied",
                                         f"e.g. {result.damaged[0]}", "run walship "
                                         "repo-sync --from another repository, or wal-verify")
        except WalshipError as error:
            error.what = f"repo-sync {source} -> {target.name}: {error.what}"
            report["error"] = error.one_line()
            first_error = first_error or error
            if len(chosen) > 1:
                logline.warning(error.one_line())
        reports.append(report)
    if as_json:
        click.echo(json.dumps(reports, indent=2))
    if first_error is not None:
        raise first_error
    return ExitStatus.OK


@cli.command("status")
@click.option("--dbname", "-d", metavar="CONNINFO", help="Server whose pg_stat_archiver to "
              "read. [default: libpq's PG* environment, if set]")
@click.option("--json", "as_json", is_flag=True, help="The status as JSON on stdout.")
@click.option("--prometheus", "prometheus", metavar="FILE", help="Also write the metrics "
              "to FILE (atomically) for node_exporter's textfile collector.")
@click.pass_obj
def status(state: _State, dbname: str | None, as_json: bool, prometheus: str | None) -> int:
    """Last archived WAL and its age, newest backup and its age, repository size, and the
    archiver's failures (from the server, when one is given)."""
    import json

    from walship import status as status_core

    current = status_core.gather(state.archive(), dbname=dbname)
    drills = _drill_status(state)
    if prometheus:
        status_core.write_textfile(prometheus, status_core.prometheus_text(current)
                                   + drills.prometheus())
    if as_json:
        click.echo(json.dumps({**status_core.status_dict(current),
                               "last_drill": drills.as_dict()}, indent=2))
        return ExitStatus.OK
    click.echo(f"repository     {current.repository}")
    age = current.last_archived_age
    click.echo(f"last archived  {current.last_archived or 'none'}"
               + (f" ({_age(age)} ago)" if age is not None else ""))
    age = current.newest_backup_age
    click.echo(f"newest backup  {current.newest_backup or 'none'}"
               + (f" (stopped {_age(age)} ago)" if age is not None else ""))
    for broken in current.broken_backups:
        click.echo(f"WARNING: backup {broken.name} ({broken.backup_type}) is newer but cannot "
                   f"be restored: its chain is broken ({broken.problem})")
    click.echo(f"WAL            {current.wal_files} files, {_size(current.wal_bytes)}")
    click.echo(f"backups        {current.backups_complete} complete, "
               f"{current.backups_incomplete} incomplete, {_size(current.backup_bytes)}")
    a = current.archiver
    if a.known:
        last = a.last_archived_wal or "-"
        click.echo(f"archiver       {a.archived_count} archived (last {last}), "
                   f"{a.failed_count} failed"
                   + (f" (last {a.last_failed_wal} at {a.last_failed_time})"
                      if a.failed_count else ""))
    else:
        click.echo(f"archiver       unknown: {a.reason}")
    for m in current.mirrors:
        click.echo(f"mirror {m.name:<8}({m.mode}) " + (
            f"{m.files} files behind" + (f", oldest {_age(m.seconds)} old" if m.files else "")
            if m.reachable else f"unreachable: {m.reason}"))
    click.echo(f"last drill     {drills.line()}")
    return ExitStatus.OK


def _drill_status(state: _State):
    from walship.drill import DEFAULT_INTERVAL, drill_status, parse_plan

    try:
        interval = parse_plan(state.settings.drill).interval
    except UsageError as error:
        logline.warning(f"{error.one_line()}; a drill is taken as due every "
                        f"{DEFAULT_INTERVAL / 86400:.0f} days")
        interval = DEFAULT_INTERVAL
    return drill_status(state.archive(), interval)



@cli.command("drill")
@click.option("--backup", default="LATEST", show_default=True, metavar="NAME|LATEST",
              help="The backup to restore (LATEST: the newest one before the target).")
@click.option("--target-time", metavar="TIME", help="Recover to TIME (with a time zone).")
@click.option("--target-lsn", metavar="LSN", help="Recover to this WAL position.")
@click.option("--target-xid", metavar="XID", help="Recover to after this transaction.")
@click.option("--target-name", metavar="NAME", help="Recover to this restore point.")
@click.option("--target", "target_kind", type=click.Choice(["immediate"]),
              help="immediate: stop as soon as the backup is consistent.")
@click.option("--scratch", metavar="DIR", help="Scratch directory: absent or empty; removed "
              "afterwards. [default: a new one under /var/tmp]")
@click.option("--port", type=int, metavar="N", help="Port of the scratch server (refused if "
              "in use). [default: a free one]")
@click.option("--pg-bindir", metavar="DIR", help="PostgreSQL's programs. [default: "
              "pg_config --bindir, else /usr/lib/postgresql/MAJOR/bin]")
@click.option("--keep", is_flag=True, help="Keep the scratch directory (the server is "
              "stopped) for inspection.")
@click.option("--rto", metavar="DURATION", help="RTO target, e.g. 1h. [drill.rto]")
@click.option("--rpo", metavar="DURATION", help="RPO target, e.g. 5min. [drill.rpo]")
@click.option("--expect-rows", "expect_rows", multiple=True, metavar="DB:SQL",
              help="A check: SQL run in DB must return at least one row.")
@click.option("--expect-no-rows", "expect_no_rows", multiple=True, metavar="DB:SQL",
              help="A check: SQL run in DB must return no row.")
@click.option("--amcheck", "amcheck", multiple=True, metavar="DB",
              help="Run pg_amcheck on DB. [drill.amcheck]")
@click.option("--dbname", "-d", metavar="CONNINFO", help="The primary, to compare the newest "
              "archived WAL's age with its archive_timeout. [default: libpq's PG* "
              "environment, if set]")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON on stdout.")
@click.option("--prometheus", metavar="FILE", help="Also write the drill's metrics to FILE "
              "(atomically) for node_exporter's textfile collector.")
@click.option("--html", "html", metavar="FILE", help="Also write the report as an HTML page "
              "to FILE (atomically).")
@click.pass_obj
def drill(state: _State, backup: str, target_time: str | None, target_lsn: str | None,
          target_xid: str | None, target_name: str | None, target_kind: str | None,
          scratch: str | None, port: int | None, pg_bindir: str | None, keep: bool,
          rto: str | None, rpo: str | None, expect_rows: tuple[str, ...],
          expect_no_rows: tuple[str, ...], amcheck: tuple[str, ...], dbname: str | None,
          as_json: bool, prometheus: str | None, html: str | None) -> int:
    """Restore drill: restore a backup and the archived WAL into a scratch directory, start
    PostgreSQL there on a free port, wait for recovery to end, validate, measure RTO and RPO
    against the targets, report, and remove everything.

    Exits 0 when the restore succeeded, every check passed and both targets were met; 8 when
    the restore or a check failed; 9 when a target was missed.
    """
    import json
    from dataclasses import replace

    from walship import drill as drills
    from walship.backup.restore import make_target
    from walship.status import server_given, write_textfile

    settings = state.settings
    plan = drills.parse_plan(settings.drill, f"config file {settings.config_file}")
    extra = [drills.flag_check(text, no_rows=False, number=i)
             for i, text in enumerate(expect_rows, 1)]
    extra += [drills.flag_check(text, no_rows=True, number=i)
              for i, text in enumerate(expect_no_rows, 1)]
    plan = replace(plan, checks=plan.checks + tuple(extra), amcheck=plan.amcheck + amcheck,
                   rto=drills.parse_duration(rto, "--rto") if rto else plan.rto,
                   rpo=drills.parse_duration(rpo, "--rpo") if rpo else plan.rpo,
                   pg_bindir=pg_bindir or plan.pg_bindir)
    target = make_target(time=target_time, lsn=target_lsn, xid=target_xid, name=target_name,
                         immediate=target_kind == "immediate")
    options = drills.DrillOptions(backup=backup, target=target, scratch=scratch, port=port,
                                  keep=keep, primary=dbname,
                                  query_primary=server_given(dbname, os.environ))
    archive = state.archive()
    try:
        report = drills.run_drill(archive, settings, plan, options, log=logline.info)
    except (drills.Interrupted, KeyboardInterrupt) as signum:
        raise drills.DrillFailed(f"drill interrupted by {signum or 'SIGINT'}", "the scratch "
                                 "server was stopped and its directory removed") from None
    try:
        if settings.read_only_primary:  # (never written: the drill itself only read)
            logline.info("drill: the result was not stored in the repository: repository "
                         "primary is read-only (an account's secondary endpoint)")
        else:
            report.stored_as = drills.store_result(archive, report)
    except WalshipError as error:
        logline.warning(f"the drill's result was not stored in the repository: "
                        f"{error.one_line()}")
    if prometheus:
        write_textfile(prometheus, drills.prometheus_text(report))
    if html:
        write_textfile(html, drills.html_report(report))
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "stored_as": report.stored_as}, indent=2))
    else:
        click.echo(drills.human_summary(report), nl=False)
    if report.result == "failed":
        raise drills.DrillFailed("drill failed", report.cause())
    if report.result == "missed":
        raise drills.TargetMissed("drill missed its target", report.cause())
    logline.info(f"drill passed backup={report.backup} rto={report.rto_seconds:.3f} "
                 f"rpo={report.rpo_seconds:.3f}")
    return ExitStatus.OK

def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _subject(argv: list[str]) -> tuple[str, str]:
    """The command name and its first argument, for error lines (escaped if it is not
    printable ASCII: the error stays one line)."""
    names = [a for a in argv if not a.startswith("-")]
    for i, word in enumerate(names):
        if word in cli.commands:
            subject = names[i + 1] if i + 1 < len(names) else ""
            if not all(" " <= char <= "~" for char in subject):
                subject = ascii(subject)
            return word, subject
    return "", ""


def run(argv: list[str], *, recovery: bool = False, started: float | None = None) -> int:
    """Run the CLI on ``argv`` and return the exit status. The one place errors are mapped.
    ``started``: when the call began (:func:`time.monotonic`), where its deadline counts from."""
    try:
        status = cli.main(args=argv, prog_name="walship", standalone_mode=False, obj=started)
    except click.exceptions.Exit as done:
        return ExitStatus(done.exit_code).for_recovery() if recovery else done.exit_code
    except click.exceptions.NoArgsIsHelpError as error:
        click.echo(error.ctx.get_help() if error.ctx else error.format_message())
        return exit_status(UsageError(""), recovery=recovery)
    except click.exceptions.ClickException as error:
        action, _ = _subject(argv)
        logline.error(action, "", UsageError(error.format_message(),
                                             hint="see walship --help"))
        return exit_status(UsageError(""), recovery=recovery)
    except click.exceptions.Abort:
        logline.info("aborted")
        return exit_status(KeyboardInterrupt(), recovery=recovery)
    except BaseException as error:  # noqa: BLE001 - mapped to a status, never swallowed as 0
        action, subject = _subject(argv)
        standby = recovery and standby_waits(error)
        if standby:
            logline.not_fatal(action, subject, error, "in a standby (standby.signal) that is "
                              "\"not available yet\" (exit 1): PostgreSQL keeps streaming "
                              "and asks the archive again later")
        else:
            debug = "--debug" in argv or _debug_from_env()
            logline.error(action, subject, error, debug=debug)
        return exit_status(error, recovery=recovery, standby=standby)
    if status is None:  # --help and the like
        return ExitStatus.OK
    return int(status)


def _debug_from_env() -> bool:
    import os

    return os.environ.get("WALSHIP_LOG_LEVEL", "").lower() == "debug"
