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
