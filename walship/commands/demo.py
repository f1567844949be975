"""``walship demo``: the main job end to end, on a throwaway cluster and a file:// repository.

It creates a temporary PostgreSQL cluster whose archive_command is ``walship wal-push``, takes
an online base backup with ``walship backup-push``, writes data, notes the time, drops the table
(the "accident"), then restores to the noted time with ``walship restore`` into a second
directory, where PostgreSQL replays the archived WAL through ``walship wal-fetch``; it checks
that the restored data equals the data before the accident, and cleans up. PostgreSQL refuses to run as root, so as root the demo runs the servers as the ``postgres``
user (or ``nobody``), after checking that this user can execute walship.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from walship.errors import ConfigError, ExitStatus, WalshipError

CHECKSUM_SQL = "SELECT count(*) || ':' || md5(string_agg(id || ',' || payload, ';' ORDER BY id))" \
               " FROM demo"


def _bindir() -> Path:
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).resolve().parent / "pg_basebackup").exists():
        return Path(initdb).resolve().parent
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out = ""
    if out and (Path(out) / "initdb").exists():
        return Path(out)
    raise ConfigError("PostgreSQL's server binaries were not found", "no initdb on PATH and "
                      "pg_config --bindir has none", "install the server (Debian: apt-get "
                      "install postgresql) or put its bin directory on PATH")


def _walship_executable() -> str:
    found = shutil.which("walship")
    candidate = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if candidate and candidate.name == "walship" and candidate.exists():
        return str(candidate)
    if found:
        return str(Path(found).resolve())
    return str(Path(sys.executable).with_name("walship"))


class _Runner:
    """Runs commands as the unprivileged user PostgreSQL needs when we are root."""

    def __init__(self) -> None:
        self.user = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self.user = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            if self.user is None:
                raise ConfigError("running as root and no unprivileged user exists",
                                  "PostgreSQL refuses to run as root",
                                  "run walship demo as an ordinary user")

    def run(self, args: list[str], env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        return subprocess.run(args, env=env, capture_output=True, text=True, check=check,
                              cwd="/", **kwargs)

    def own(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)


def run_demo(keep: bool = False, segments: int = 4) -> int:
    bindir = _bindir()
    walship = _walship_executable()
    runner = _Runner()
    probe = runner.run([walship, "--version"], check=False)
    if probe.returncode != 0:
        who = runner.user.pw_name if runner.user else "this user"
        raise ConfigError(f"{who} cannot run {walship}", "PostgreSQL runs archive_command as "
                          "its own OS user", "install walship in a venv others can read, e.g. "
                          "/usr/bin/python3 -m venv /opt/walship && /opt/walship/bin/pip "
                          "install walship, then run /opt/walship/bin/walship demo")
    base = Path(tempfile.mkdtemp(prefix="walship-demo-", dir="/tmp"))
    os.chmod(base, 0o755)
    runner.own(base)
    say = lambda text: click.echo(f"walship demo: {text}")  # noqa: E731
    succeeded = False
    try:
        status = _demo(base, bindir, walship, runner, segments, say)
        succeeded = True
        return status
    except subprocess.CalledProcessError as error:
        detail = (error.stderr or error.stdout or "").strip().splitlines()[-3:]
        raise WalshipError(f"demo step failed: {Path(error.cmd[0]).name}",
                           " / ".join(detail), f"logs are kept in {base}") from None
    finally:
        for data in ("primary", "restored"):
            if (base / data / "postmaster.pid").exists():
                runner.run([str(bindir / "pg_ctl"), "-D", str(base / data), "-m", "immediate",
                            "stop"], check=False)
        if keep:
            say(f"kept {base}")
        elif succeeded:
            shutil.rmtree(base, ignore_errors=True)


def _demo(base: Path, bindir: Path, walship: str, runner: _Runner, segments: int,
          say) -> int:  # noqa: ANN001
    pg = lambda tool: str(bindir / tool)  # noqa: E731
    repo = base / "repo"
    for directory in (repo, base / "primary", base / "restored"):
        directory.mkdir(mode=0o700)
        runner.own(directory)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALSHIP_", "PG"))}
    env.update(WALSHIP_REPO=f"file://{repo}", WALSHIP_CONFIG=os.devnull, HOME=str(base),
               LC_ALL="C", PGHOST=str(base), PGUSER="postgres", PGDATABASE="postgres")
    psql = [pg("psql"), "-X", "-q", "-A", "-t", "-c"]
    server_conf = (f"listen_addresses = ''\nunix_socket_directories = '{base}'\n"
                   "max_wal_size = 64MB\nshared_buffers = 32MB\n")

    def sql(query: str) -> str:
        return runner.run(psql + [query], env).stdout.strip()

    def wait_archived(last: str) -> int:
        waited = time.monotonic()
        while True:
            count, archived, failed = (sql("SELECT archived_count || ' ' || coalesce("
                                           "last_archived_wal, '-') || ' ' || failed_count "
                                           "FROM pg_stat_archiver").split() + ["", "", ""])[:3]
            if archived != "-" and archived >= last:
                return int(count)
            if time.monotonic() - waited > 60:
                raise WalshipError("WAL archiving did not catch up within 60 s",
                                   f"{failed} failures", f"see {base / 'primary.log'}")
            time.sleep(0.1)

    def insert(first: int, count: int) -> None:
        sql(f"INSERT INTO demo SELECT g, md5(g::text) FROM generate_series({first}, "
            f"{first + count - 1}) g")
        sql("SELECT pg_switch_wal()")

    started = time.monotonic()
    say(f"PostgreSQL from {bindir}; repository file://{repo}")
    runner.run([pg("initdb"), "-D", str(base / "primary"), "-U", "postgres", "--auth=trust",
                "--no-instructions"], env)
    with open(base / "primary" / "postgresql.auto.conf", "a") as conf:
        conf.write(server_conf + "wal_level = replica\narchive_mode = on\n"
                   f"archive_command = '{walship} wal-push %p'\n")
    runner.run([pg("pg_ctl"), "-D", str(base / "primary"), "-l", str(base / "primary.log"),
                "-w", "start"], env)
    say("primary started with archive_command = 'walship wal-push %p'")

    sql("CREATE TABLE demo (id int PRIMARY KEY, payload text)")
    insert(1, 20000)
    step = time.monotonic()
    runner.run([walship, "backup-push"], env)
    say(f"walship backup-push took an online base backup in {time.monotonic() - step:.1f} s")
    for round_ in range(1, segments):
        insert(round_ * 20000 + 1, 20000)
    expected = sql(CHECKSUM_SQL)
    target = sql("SELECT clock_timestamp()")
    say(f"{expected.split(':')[0]} rows written; point in time to come back to: {target}")
    time.sleep(0.05)
    sql("DROP TABLE demo")
    say("accident: DROP TABLE demo")
    last = sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    sql("SELECT pg_switch_wal()")
    count = wait_archived(last)
    say(f"{count} WAL files archived by walship wal-push")
    runner.run([pg("pg_ctl"), "-D", str(base / "primary"), "-m", "fast", "-w", "stop"], env)

    restored = base / "restored"
    step = time.monotonic()
    runner.run([walship, "restore", str(restored), "--target-time", target,
                "--target-action", "promote", "--archive-mode", "off"], env)
    fetched = time.monotonic() - step
    say(f"walship restore fetched and verified the backup and wrote the recovery settings "
        f"(target time {target}) in {fetched:.1f} s")
    step = time.monotonic()
    runner.run([pg("pg_ctl"), "-D", str(restored), "-l", str(base / "restored.log"), "-w",
                "-t", "120", "start"], env)
    while sql("SELECT pg_is_in_recovery()") != "f":
        if time.monotonic() - step > 120:
            raise WalshipError("recovery did not finish within 120 s",
                               hint=f"see {base / 'restored.log'}")
        time.sleep(0.1)
    say(f"PostgreSQL replayed the WAL with restore_command = 'walship wal-fetch %f %p' and "
        f"stopped at the target in {time.monotonic() - step:.1f} s")
    actual = sql(CHECKSUM_SQL)
    if actual != expected:
        raise WalshipError("restored data differs from the original",
                           f"expected {expected}, got {actual}", f"logs are in {base}")
    stored = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())
    say(f"restored data matches the original before the accident ({actual.split(':')[0]} rows, "
        "same checksum)")
    say(f"repository holds {stored / 1e6:.1f} MB (backup and {count} WAL files); "
        f"total {time.monotonic() - started:.1f} s")
    return ExitStatus.OK
