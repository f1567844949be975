"""The command line: one thin click function per command over the archive core.

Commands parse arguments, build settings, call the core and log one line. Errors are turned
into exit statuses in exactly one place, :func:`run`, through :func:`walship.errors.exit_status`.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from walship import __version__, logline
from walship.config import Settings, load_settings
from walship.errors import ExitStatus, NotFound, UsageError, exit_status


class _State:
    """What the group passes to its commands: the flags, resolved into settings on demand."""

    def __init__(self, flags: dict[str, Any], config_file: str | None) -> None:
        self.flags = flags
        self.config_file = config_file
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.flags, config_file=self.config_file)
        return self._settings

    def archive(self):  # noqa: ANN201 - walship.archive.Archive, imported lazily
        from walship.archive import open_archive

        return open_archive(self.settings)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", metavar="URL", help="Repository: file:///path or "
              "azure://container[/prefix]. [env WALSHIP_REPO]")
@click.option("--config", "config_file", metavar="FILE", help="TOML config file. "
              "[env WALSHIP_CONFIG; default /etc/walship/walship.toml if present]")
@click.option("--encryption-key-file", metavar="FILE", help="Encrypt and authenticate with "
              "the key in FILE (see keygen). [env WALSHIP_ENCRYPTION_KEY_FILE]")
@click.option("--compression-level", type=int, metavar="N",
              help="zstd level, 1-22. [env WALSHIP_COMPRESSION_LEVEL; default 3]")
@click.option("--debug", is_flag=True, default=None, help="Tracebacks on errors. "
              "[env WALSHIP_LOG_LEVEL=debug]")
@click.version_option(__version__, prog_name="walship")
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
    ctx.obj = _State(flags, config_file)


@cli.command("wal-push")
@click.argument("path", metavar="PATH")
@click.pass_obj
def wal_push(state: _State, path: str) -> int:
    """Archive one WAL file (archive_command = 'walship wal-push %p').

    Exits 0 only once the file is durably stored. Pushing identical content again exits 0;
    different content under an existing name is refused (exit 3) and the stored copy kept.
    """
    from walship.pushahead import push

    logline.transfer(push(state.archive(), state.settings, path))
    return ExitStatus.OK


@cli.command("wal-fetch")
@click.argument("name", metavar="NAME")
@click.argument("destination", metavar="DEST")
@click.pass_obj
def wal_fetch(state: _State, name: str, destination: str) -> int:
    """Restore one WAL file (restore_command = 'walship wal-fetch %f %p').

    Exits 0 once DEST holds the complete, verified file; 1 only when the repository says the
    file does not exist; 126 or more on any other failure, so that PostgreSQL stops recovery
    instead of ending it early.
    """
    from walship.prefetch import fetch

    try:
        result = fetch(state.archive(), state.settings, name, destination)
    except NotFound:
        logline.info(f"wal-fetch {name} not found in the archive")
        return ExitStatus.NOT_FOUND
    logline.transfer(result)
    return ExitStatus.OK


@cli.command("keygen")
def keygen() -> int:
    """Print a new random encryption key (redirect it into a file only walship can read)."""
    from walship.codec.keys import EncryptionKey

    if sys.stdout.isatty():
        logline.info("this is a secret key: redirect it, e.g. walship keygen > /etc/walship/key")
    sys.stdout.write(EncryptionKey.generate().to_text())
    return ExitStatus.OK


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
    archive = state.archive()
    from walship import layout

    count = sum(1 for _ in zip(range(1000), archive.storage.list(layout.WAL_PREFIX)))
    click.echo(f"repository {archive.storage.url}: reachable, "
               f"{count if count < 1000 else '1000+'} WAL files")
    return ExitStatus.OK


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
@click.pass_obj
def backup_push(state: _State, dbname: str | None, part_size: int, checkpoint: str) -> int:
    """Take an online base backup of the local server into the repository.

    Run it on the database server as its OS user (it reads the data directory), e.g. daily
    from cron: 0 2 * * * postgres walship backup-push
    """
    from walship.backup.progress import for_stderr
    from walship.backup.push import push_backup
    from walship.backup.source import PostgresSource

    archive = state.archive()
    result = push_backup(archive, PostgresSource(dbname, log=logline.info),
                         parallel=state.settings.parallel, part_size=part_size << 20,
                         fast=checkpoint == "fast", progress=for_stderr("backup-push"),
                         log=logline.info)
    manifest = result.manifest
    logline.info(f"backup-push {manifest.name} stored in={result.bytes_in} "
                 f"out={result.bytes_out} seconds={result.seconds:.3f} "
                 f"files={len(manifest.files)} parts={len(manifest.parts)}")
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
@click.pass_obj
def backup_list(state: _State, as_json: bool) -> int:
    """List the backups, oldest first, and whether the WAL each one needs is archived.

    A backup is usable when it is complete (its manifest was written) and the WAL from its
    start to its stop segment is in the archive.
    """
    import json

    from walship.backup import catalog

    archive = state.archive()
    index = catalog.WalIndex(archive)
    rows = [catalog.summary(entry, index) for entry in catalog.list_backups(archive)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return ExitStatus.OK
    header = ("NAME", "START (UTC)", "START LSN", "STOP LSN", "TL", "SIZE", "STORED",
              "SECONDS", "WAL")
    table = [header]
    for row in rows:
        if not row["complete"]:
            table.append((str(row["name"]), "-", "-", "-", "-", "-", _size(row["stored_size"]),
                          "-", "INCOMPLETE (no manifest, never used)"))
            continue
        table.append((str(row["name"]), str(row["start_time"])[:19].replace("T", " "),
                      str(row["start_lsn"]), str(row["stop_lsn"]), str(row["timeline"]),
                      _size(row["size"]), _size(row["stored_size"]),
                      f"{row['duration']:.1f}",
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
@click.option("--force", is_flag=True, help="Replace the content of a non-empty DIR.")
@click.pass_obj
def backup_fetch(state: _State, name: str, directory: str, mappings: tuple[str, ...],
                 force: bool) -> int:
    """Download a backup into DIR, every file checked against its manifest.

    Nothing PostgreSQL could start on is left behind if any check fails. For point-in-time
    recovery use restore, which also writes the recovery settings.
    """
    from walship.backup.fetch import fetch_backup
    from walship.backup.progress import for_stderr

    result = fetch_backup(state.archive(), name, directory, tablespace_map=_tablespace_map(
        mappings), force=force, parallel=state.settings.parallel,
        progress=for_stderr("backup-fetch"))
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
@click.option("--force", is_flag=True, help="Replace the content of a non-empty DIR.")
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
    from walship.backup.progress import for_stderr
    from walship.backup.restore import make_target
    from walship.backup.restore import restore as run_restore

    target = make_target(time=target_time, lsn=target_lsn, xid=target_xid, name=target_name,
                         immediate=target_kind == "immediate")
    result = run_restore(state.archive(), directory, target, action=target_action,
                         standby=standby, backup=backup,
                         tablespace_map=_tablespace_map(mappings), force=force,
                         archive_mode_off=archive_mode == "off",
                         parallel=state.settings.parallel, progress=for_stderr("restore"))
    fetched = result.fetch
    logline.info(f"restore {fetched.manifest.name} delivered in={fetched.bytes_in} "
                 f"out={fetched.bytes_out} seconds={fetched.seconds:.3f} into "
                 f"{fetched.directory} target={result.target.describe()} "
                 f"signal={result.signal}; start the server to recover")
    return ExitStatus.OK


def _subject(argv: list[str]) -> tuple[str, str]:
    """The command name and its first argument, for error lines."""
    names = [a for a in argv if not a.startswith("-")]
    for i, word in enumerate(names):
        if word in cli.commands:
            return word, names[i + 1] if i + 1 < len(names) else ""
    return "", ""


def run(argv: list[str], *, recovery: bool = False) -> int:
    """Run the CLI on ``argv`` and return the exit status. The one place errors are mapped."""
    try:
        status = cli.main(args=argv, prog_name="walship", standalone_mode=False)
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
        debug = "--debug" in argv or _debug_from_env()
        logline.error(action, subject, error, debug=debug)
        return exit_status(error, recovery=recovery)
    if status is None:  # --help and the like
        return ExitStatus.OK
    return int(status)


def _debug_from_env() -> bool:
    import os

    return os.environ.get("WALSHIP_LOG_LEVEL", "").lower() == "debug"
