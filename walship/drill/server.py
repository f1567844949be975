"""The drill's scratch server: the restored cluster made private (its own ``pg_hba.conf``
on a socket inside the scratch directory, no TCP listener, no archiving, no replication
connection), started with pg_ctl in the environment that lets its ``wal-fetch`` find the
repository, watched, and stopped with walship's prefetch worker."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from walship.drill.scratch import Runner, Scratch
from walship.errors import DrillFailed


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def server_environment(settings: Any, environ: Mapping[str, str] | None = None
                       ) -> dict[str, str]:
    """The scratch server's environment, so that its ``wal-fetch`` finds the repository and key
    the drill uses, whichever source they came from (flags, environment, config file)."""
    env = dict(os.environ if environ is None else environ)
    env["WALSHIP_REPO"] = settings.require_repo()
    if settings.encryption_key_file:
        env["WALSHIP_ENCRYPTION_KEY_FILE"] = os.path.abspath(settings.encryption_key_file)
    env["WALSHIP_CONFIG"] = settings.config_file or os.devnull
    names = {"connection_string": "AZURE_STORAGE_CONNECTION_STRING",
             "account": "AZURE_STORAGE_ACCOUNT", "account_key": "AZURE_STORAGE_KEY",
             "sas_token": "AZURE_STORAGE_SAS_TOKEN",
             "account_url": "AZURE_STORAGE_ACCOUNT_URL"}
    for name, variable in names.items():
        value = getattr(settings.azure, name, None)
        if value:
            env[variable] = value
    for variable in ("PGDATA", "PGPORT", "PGHOST"):
        env.pop(variable, None)
    return env


def controldata(runner: Runner, bindir: Path, data: Path) -> dict[str, str]:
    proc = runner.run([str(bindir / "pg_controldata"), "-D", str(data)],
                      env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
    if proc.returncode != 0:
        raise DrillFailed("pg_controldata failed on the restored directory",
                          last_line(proc.stderr))
    return {k.strip(): v.strip() for k, _, v in
            (line.partition(":") for line in proc.stdout.splitlines()) if v}


def configure(scratch: Scratch, runner: Runner, port: int, control: Mapping[str, str]) -> None:
    """Make the restored cluster a private scratch server (appended to postgresql.auto.conf,
    so these lines win; a missing postgresql.conf, as on Debian, is written)."""
    hba = scratch.run / "pg_hba.conf"
    hba.write_text("# walship drill: trust on the drill's private socket only\n"
                   "local all all trust\n")
    runner.own(hba)
    conf = scratch.data / "postgresql.conf"
    if not conf.exists():
        lines = ["# walship drill: the backup holds no postgresql.conf; the settings that",
                 "# recovery needs at least as high as the primary's (from pg_control)"]
        for setting, label in (("max_connections", "max_connections setting"),
                               ("max_worker_processes", "max_worker_processes setting"),
                               ("max_wal_senders", "max_wal_senders setting"),
                               ("max_prepared_transactions", "max_prepared_xacts setting"),
                               ("max_locks_per_transaction", "max_locks_per_xact setting")):
            if control.get(label, "").isdigit():
                lines.append(f"{setting} = {control[label]}")
        conf.write_text("\n".join(lines) + "\n")
        os.chmod(conf, 0o600)
        runner.own(conf)
    settings = {"port": str(port), "listen_addresses": _quote(""),
                "unix_socket_directories": _quote(str(scratch.run)),
                "hba_file": _quote(str(hba)), "archive_mode": "off",
                "hot_standby": "on", "primary_conninfo": _quote(""),
                "primary_slot_name": _quote(""), "synchronous_standby_names": _quote(""),
                "logging_collector": "off", "log_destination": _quote("stderr"),
                "ssl": "off", "cluster_name": _quote("walship-drill"),
                "log_line_prefix": _quote("%m [%p] "), "log_timezone": _quote("UTC")}
    with open(scratch.data / "postgresql.auto.conf", "a", encoding="utf-8") as auto:
        auto.write("# walship drill: a private scratch server (these lines win)\n")
        auto.writelines(f"{name} = {value}\n" for name, value in settings.items())


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def server_failure(log: Path) -> str:
    """The server log's last FATAL/PANIC/ERROR lines (what stopped recovery)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "no server log"
    wanted = [line.strip() for line in text.splitlines()
              if re.search(r"\b(FATAL|PANIC|ERROR):", line)]
    picked = wanted[-3:] if wanted else text.strip().splitlines()[-3:]
    return " / ".join(picked)[-900:]


class Server:
    """The scratch server: started with pg_ctl, watched, stopped."""

    def __init__(self, scratch: Scratch, runner: Runner, bindir: Path, port: int,
                 env: Mapping[str, str], role: str) -> None:
        self.scratch, self.runner, self.bindir, self.port = scratch, runner, bindir, port
        self.env, self.role = env, role
        self.started = False

    def start(self) -> None:
        self.started = True
        proc = self.runner.run([str(self.bindir / "pg_ctl"), "-D", str(self.scratch.data),
                                "-l", str(self.scratch.log), "-W", "start"], env=self.env)
        if proc.returncode != 0:
            raise DrillFailed("the scratch server did not start", last_line(
                proc.stderr) or server_failure(self.scratch.log))

    def pid(self) -> int | None:
        try:
            pid = int((self.scratch.data / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def connect(self, database: str = "postgres", timeout: int = 10):
        import psycopg

        return psycopg.connect(host=str(self.scratch.run), port=self.port, user=self.role,
                               dbname=database, connect_timeout=timeout, autocommit=True,
                               application_name="walship drill")

    def stop(self) -> None:
        """Stop the server (fast, then immediate), then walship's prefetch worker."""
        if self.started and self.pid() is not None:
            for mode in ("fast", "immediate"):
                try:
                    self.runner.run([str(self.bindir / "pg_ctl"), "-D", str(self.scratch.data),
                                     "-m", mode, "-w", "-t", "60", "stop"], env=self.env,
                                    timeout=90)
                except DrillFailed:
                    pass
                if self.pid() is None:
                    break
            deadline = time.monotonic() + 10
            while self.pid() is not None and time.monotonic() < deadline:
                time.sleep(0.05)
        stop_prefetch_worker(self.scratch.data)


def stop_prefetch_worker(data: Path) -> None:
    """End the detached ``wal-fetch`` prefetch worker of the scratch cluster (its pid is in the
    cache's lock file; it is signalled only if it is that worker, working in that cluster)."""
    cache = data / "pg_wal" / "walship" / "prefetch"
    try:
        pid = int((cache / "worker.lock").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, ValueError, IndexError):
        return
    if not any(b"walship.prefetch" in part for part in cmdline):
        return
    if cwd != str(data) and str(cache).encode() not in cmdline:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
