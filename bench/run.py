"""Side-by-side benchmark: walship, pgBackRest and barman-cloud archiving the same real pgbench
WAL to one Azurite (HTTPS) and bringing it back, the way PostgreSQL calls them.

    bash bench/setup.sh && /opt/walship-venv/bin/python bench/run.py

Measures, in one run on one Azurite:
  (a) archive drain: a PostgreSQL 15 cluster with a backlog of >= 60 segments marked .ready
      switches archive_command on; time until pg_stat_archiver.last_archived_wal is the last one;
  (b) restore feed: restore_command run the way PostgreSQL runs it (sh -c, one segment at a time,
      in order) for every segment, from the archive each tool filled in (a); byte-identical check;
  (c) recovery: a base backup taken part-way through the backlog, recovered with each tool's
      restore_command until promotion, and with a plain `cp` from a directory (the floor);
  (d) bytes stored per tool; peak RSS of single push and fetch calls;
  (e)-(g) base backups and their restores; (h) the restore drill: RTO end to end (--only drill
      runs just that and writes it as its own section of the report).
Each timed measurement runs --repeat times (default 5); tables show medians. Writes
docs/benchmarks.md after a full run (not with --quick). Everything runs under /tmp/walship-bench-*
and is removed afterwards (servers stopped, Azurite killed), also on errors or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import filecmp
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import pgcluster  # noqa: E402
from azurite import Azurite, find_binary  # noqa: E402
from pgcluster import BIN, Cluster, copy_tree, make_dir, run_pg  # noqa: E402
from peers import (Barman, BarmanParallel, Context, PgBackRest, PgBackRestSync, Tool,  # noqa: E402
                   Walship, WalshipBaseline)
from pgwire import Connection, PgError  # noqa: E402
from backups import BackupBench  # noqa: E402

REPO = HERE.parent
SEGMENT = 16 * 2**20
POLL = 0.05
DEFAULT_CERT_DIR = Path(os.environ.get("WALSHIP_BENCH_DIR", "/opt/walship-bench"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- processes the tools leave behind ---------------------------------------------------------
def _processes_under(path: Path) -> list[int]:
    """Processes (not us) whose command line or working directory is in ``path``: the tools'
    detached helpers (walship's prefetch worker, pgBackRest's async processes) left by a run."""
    needle = str(path)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                cwd = ""
        except OSError:
            continue
        if needle.encode() in cmdline or cwd == needle or cwd.startswith(needle + "/"):
            found.append(int(entry))
    return found


def peak_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def process_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by the processes ``pids`` (gone ones: 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU time used by the whole machine so far (all processes, user + system), from
    /proc/stat: measured around a run, it tells whether the run was CPU-bound."""
    with open("/proc/stat") as handle:
        fields = handle.readline().split()[1:]
    busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))  # not idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


def kill_strays(path: Path) -> dict[int, int | None]:
    """Terminate leftover processes of a run (by pid); return their peak RSS (KiB)."""
    pids = _processes_under(path)
    peaks = {pid: peak_rss_kib(pid) for pid in pids}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return peaks


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class CacheSampler:
    """Samples the size of walship's prefetch cache every 10 ms in a thread: the largest total
    of its files (complete, sealed and partial downloads) seen during a run."""

    def __init__(self, path: Path) -> None:
        import threading

        self.path, self.max_bytes, self.max_segments, self.samples = path, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            total = segments = 0
            try:
                entries = os.listdir(self.path)
            except OSError:
                continue
            for entry in entries:
                # segment data only: cached segments (NAME) and partial downloads (.NAME.*),
                # not the seals, markers, want file, lock and log
                if not (entry[:1] in "0123456789ABCDEF" and "." not in entry
                        or entry.startswith(".")):
                    continue
                try:
                    size = os.stat(os.path.join(self.path, entry)).st_size
                except OSError:
                    continue
                total += size
                segments += 1
            self.samples += 1
            self.max_bytes = max(self.max_bytes, total)
            self.max_segments = max(self.max_segments, segments)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- the WAL backlog --------------------------------------------------------------------------
class Template:
    """A stopped cluster whose pg_wal holds a backlog of .ready segments, and a base backup
    taken part-way through it."""

    def __init__(self, data: Path, base: Path, backlog: list[str], replayed: list[str],
                 counts: str, seconds: float) -> None:
        self.data, self.base, self.backlog, self.replayed = data, base, backlog, replayed
        self.counts, self.seconds = counts, seconds


# What the recovered database must show: pgbench's history (append-only; the sum of its deltas is
# the sum of all account balances). Scanning pgbench_accounts instead would prune pages and so
# write WAL of its own.
CHECK_SQL = "SELECT count(*) || '/' || coalesce(sum(delta), 0) FROM pgbench_history"


def build_template(work: Path, segments: int, replay: int, scale: int) -> Template:
    started = time.monotonic()
    tdir = make_dir(work / "template")
    data = tdir / "data"
    cluster = Cluster.initdb(data, tdir / "sock", tdir / "postgres.log")
    cluster.base_settings()
    # archive_mode on with no archive_command: PostgreSQL marks every finished segment .ready
    # and keeps it, and nothing archives it.
    # Checkpoints every 30 s while pgbench runs: PostgreSQL then writes full-page images as it
    # does after every checkpoint in production, and the backlog is written in about a minute.
    cluster.configure(archive_mode=True, archive_command="", checkpoint_timeout="30s")
    cluster.start()
    pgbench = [str(BIN / "pgbench"), "-h", str(cluster.sockdir), "-U", "postgres"]

    def written() -> int:
        """Segments finished so far, from the insert position: PostgreSQL creates some .ready
        files only later (at a checkpoint), so counting them would overshoot."""
        current = cluster.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
        return int(current[8:16], 16) * 256 + int(current[16:], 16) - 1

    def fill(target: int) -> None:
        deadline = time.monotonic() + 900
        while written() < target:
            if time.monotonic() > deadline:
                raise RuntimeError("pgbench did not write enough WAL in 15 minutes")
            run_pg(pgbench + ["-n", "-c", "2", "-j", "2", "-T", "1", "postgres"])

    try:
        run_pg(pgbench + ["-i", "-q", "-s", str(scale), "postgres"])
        fill(segments - replay)
        log(f"template: {written()} segments written; taking the base backup")
        base = make_dir(tdir / "base")
        cluster.psql("CHECKPOINT")
        label = tdir / "backup_label.out"
        script = tdir / "backup.sql"
        # PostgreSQL's low-level backup API (what pg_basebackup does inside), because
        # pg_basebackup -X none insists on waiting until the WAL it needs is archived, and
        # this backlog must stay unarchived.
        script.write_text(
            "SELECT pg_backup_start('walship-bench', true);\n"
            f"\\! cp -a {shlex.quote(str(data))}/. {shlex.quote(str(base))}/ 2>/dev/null; true\n"
            "\\pset tuples_only on\n\\pset format unaligned\n"
            f"\\o {label}\nSELECT labelfile FROM pg_backup_stop(false);\n\\o\n")
        pgcluster.chown_tree(script)
        run_pg([str(BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h",
                str(cluster.sockdir), "-U", "postgres", "-d", "postgres", "-f", str(script)])
        label_text = label.read_text().rstrip("\n") + "\n"
        for junk in ["postmaster.pid", "postmaster.opts"]:
            (base / junk).unlink(missing_ok=True)
        for sub in ["pg_wal", "pg_replslot", "pg_stat_tmp"]:
            for entry in (base / sub).iterdir():
                if entry.is_dir() and entry.name == "archive_status":
                    for status in entry.iterdir():
                        status.unlink()
                elif entry.is_dir():
                    pgcluster.remove_tree(entry)
                else:
                    entry.unlink()
        (base / "backup_label").write_text(label_text)
        pgcluster.chown_tree(base)
        start_file = label_text.split("(file ", 1)[1].split(")", 1)[0]
        before = int(start_file[8:16], 16) * 256 + int(start_file[16:], 16) - 1
        fill(max(segments, before + replay) - 1)
        counts = cluster.psql(CHECK_SQL)
        cluster.psql("SELECT pg_switch_wal()")  # the last transactions are in .ready WAL too
    finally:
        cluster.stop()
    cluster.configure(checkpoint_timeout="5min")  # the default again, for every run
    (base / "postgresql.auto.conf").write_text((data / "postgresql.auto.conf").read_text())
    backlog = pgcluster.ready_segments(data)
    if len(backlog) < segments:
        raise RuntimeError(f"only {len(backlog)} segments .ready, wanted {segments}")
    for name in backlog:
        if (data / "pg_wal" / name).stat().st_size != SEGMENT:
            raise RuntimeError(f"{name} is not a 16 MiB segment")
    replayed = [n for n in backlog if n >= start_file]
    # The recovery (c) asks for WAL from the backup's start on; every one of those must be in
    # the backlog, or a tool would be asked for something nobody archived.
    if not replayed or replayed[0] != start_file:
        raise RuntimeError(f"backup starts in {start_file}, not in the backlog")
    log(f"template: {len(backlog)} segments .ready ({backlog[0]}..{backlog[-1]}), base backup "
        f"from {start_file} ({len(replayed)} segments to replay), "
        f"{time.monotonic() - started:.0f} s")
    return Template(data, base, backlog, replayed, counts, time.monotonic() - started)


# -- the measurements -------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, azurite: Azurite,
                 ctx: Context) -> None:
        self.args, self.work, self.azurite, self.ctx = args, work, azurite, ctx
        self.template: Template | None = None
        self.results: dict = {"drain": {}, "feed": {}, "recovery": {}, "stored": {},
                              "rss": {}, "notes": []}

    # (a) ---------------------------------------------------------------------------------------
    def drain(self, tool: Tool, repeat: int) -> dict:
        t = self.template
        container = f"{tool.key}-{repeat}"
        run_dir = make_dir(self.work / f"drain-{tool.key}-{repeat}")
        data = run_dir / "data"
        copy_tree(t.data, data)
        sockdir = make_dir(run_dir / "sock")
        cluster = Cluster(data, sockdir, run_dir / "postgres.log")
        cluster.configure(unix_socket_directories=str(sockdir), archive_command="",
                          log_min_messages="log")
        tool.create_repo(container)
        home = make_dir(run_dir / "home")
        cluster.start(env=tool.env(container, home))
        try:
            tool.prepare(container, run_dir, data, sockdir)
            command = tool.archive_command(container, run_dir, data, sockdir)
            last = t.backlog[-1]
            with cluster.connect() as conn:
                conn.query("ALTER SYSTEM SET archive_command = '"
                           + command.replace("'", "''") + "'")
                warmed = pgcluster.warm_memory(self.work, self.args.warm_mib)
                started = time.perf_counter()
                cpu_started = cpu_seconds()
                conn.query("SELECT pg_reload_conf()")
                deadline = started + self.args.timeout
                while True:
                    done, failed = conn.query(
                        "SELECT last_archived_wal, failed_count FROM pg_stat_archiver")[0]
                    if done is not None and len(done) == 24 and done >= last:
                        break
                    if time.perf_counter() > deadline or int(failed) >= 3:
                        raise RuntimeError(
                            f"{tool.label}: archiving stuck at {done}, {failed} failures:\n"
                            f"{cluster.log_tail()}")
                    time.sleep(POLL)
                seconds = time.perf_counter() - started
                cpu = cpu_seconds() - cpu_started
                failed = int(conn.value("SELECT failed_count FROM pg_stat_archiver"))
        finally:
            cluster.stop()
            kill_strays(run_dir)
        pgcluster.remove_tree(data)
        blobs, stored = tool.usage(container)
        if blobs < len(t.backlog):
            raise RuntimeError(f"{tool.label}: {blobs} blobs stored for {len(t.backlog)} "
                               "segments")
        return {"seconds": seconds, "failed": failed, "blobs": blobs, "bytes": stored,
                "cpu": cpu, "warm_seconds": warmed}

    # (b) ---------------------------------------------------------------------------------------
    def feed(self, tool: Tool, repeat: int, sample: bool = False) -> dict:
        """One timed feed; with ``sample`` (walship only), an untimed one that samples the
        prefetch cache (the sampler's thread takes CPU from the run it watches)."""
        t = self.template
        container = f"{tool.archive_key}-1"
        run_dir = make_dir(self.work / f"feed-{tool.key}-{repeat}{'-sampled' if sample else ''}")
        fake = make_dir(run_dir / "data")  # what restore_command sees of a data directory
        make_dir(fake / "pg_wal")
        make_dir(fake / "global")
        shutil.copy2(t.data / "global" / "pg_control", fake / "global" / "pg_control")
        shutil.copy2(t.data / "PG_VERSION", fake / "PG_VERSION")
        pgcluster.chown_tree(fake)
        os.chmod(fake, 0o700)
        template = tool.restore_command(container, run_dir, fake)
        env = tool.env(container, make_dir(run_dir / "home"))
        calls, rss = [], []
        wal = fake / "pg_wal"
        stderr = open(run_dir / "stderr.log", "ab")
        sampler = CacheSampler(wal / "walship" / "prefetch") if sample else None
        server = _processes_under(self.azurite.location)
        warmed = pgcluster.warm_memory(self.work, self.args.warm_mib)
        try:
            started = time.perf_counter()
            cpu_started = cpu_seconds()
            calls_started = os.times()
            server_started = process_cpu(server)
            for name in t.backlog:
                command = template.replace("%f", name).replace("%p", "pg_wal/RECOVERYXLOG")
                call = time.perf_counter()
                proc = subprocess.Popen(["/bin/sh", "-c", command], cwd=fake, env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=stderr,
                                        **pgcluster.as_postgres())
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                calls.append(time.perf_counter() - call)
                rss.append(usage.ru_maxrss)
                if proc.returncode != 0:
                    raise RuntimeError(f"{tool.label}: restore of {name} exited "
                                       f"{proc.returncode}:\n"
                                       f"{(run_dir / 'stderr.log').read_text()[-3000:]}")
                os.rename(wal / "RECOVERYXLOG", wal / name)
            seconds = time.perf_counter() - started
            cpu = cpu_seconds() - cpu_started
            calls_ended = os.times()
            # where the CPU went: the calls (the harness's children: sh and the tool's
            # command), the detached helpers they started, Azurite
            calls_cpu = (calls_ended.children_user + calls_ended.children_system
                         - calls_started.children_user - calls_started.children_system)
            server_cpu = process_cpu(server) - server_started
            helpers_cpu = process_cpu(_processes_under(run_dir))
        finally:
            stderr.close()
            if sampler:
                sampler.stop()
            workers = kill_strays(run_dir)
        for name in t.backlog:
            if not filecmp.cmp(wal / name, t.data / "pg_wal" / name, shallow=False):
                raise RuntimeError(f"{tool.label}: restored {name} differs from the original")
        pgcluster.remove_tree(fake)
        return {"seconds": seconds, "cpu": cpu, "calls_cpu": calls_cpu, "warm_seconds": warmed,
                "helpers_cpu": helpers_cpu, "server_cpu": server_cpu,
                "call_median": statistics.median(calls),
                "call_max": max(calls), "rss_kib_max": max(rss),
                "worker_rss_kib": max((v or 0) for v in workers.values()) if workers else None,
                "verified": len(t.backlog),
                "cache_max_bytes": sampler.max_bytes if sampler else None,
                "cache_max_segments": sampler.max_segments if sampler else None,
                "cache_samples": sampler.samples if sampler else None}

    # (c) ---------------------------------------------------------------------------------------
    def recovery(self, tool: Tool | None, repeat: int) -> dict:
        t = self.template
        key = tool.key if tool else "cp"
        container = f"{tool.archive_key if tool else key}-1"
        run_dir = make_dir(self.work / f"recovery-{key}-{repeat}")
        data = run_dir / "data"
        copy_tree(t.base, data)
        sockdir = make_dir(run_dir / "sock")
        cluster = Cluster(data, sockdir, run_dir / "postgres.log")
        if tool is None:
            command = f"cp {shlex.quote(str(self.plain_dir))}/%f %p"
            env = pgcluster.base_env(str(make_dir(run_dir / "home")))
        else:
            command = tool.restore_command(container, run_dir, data)
            env = tool.env(container, make_dir(run_dir / "home"))
        cluster.configure(unix_socket_directories=str(sockdir), archive_mode=False,
                          archive_command="", restore_command=command,
                          recovery_target_action="promote", hot_standby=True,
                          log_min_messages="log")
        (data / "recovery.signal").touch()
        pgcluster.chown_tree(data)
        warmed = pgcluster.warm_memory(self.work, self.args.warm_mib)
        try:
            started = time.perf_counter()
            cpu_started = cpu_seconds()
            cluster.start(env=env, wait=False)
            deadline = started + self.args.timeout
            conn = None
            while True:
                now = time.perf_counter()
                if now > deadline:
                    raise RuntimeError(f"{key}: recovery did not finish:\n{cluster.log_tail()}")
                if now - started > 3 and not (data / "postmaster.pid").exists():
                    raise RuntimeError(f"{key}: the server stopped:\n{cluster.log_tail()}")
                if conn is None:
                    try:
                        conn = Connection(str(sockdir), timeout=5)
                    except (OSError, PgError):
                        time.sleep(POLL)
                        continue
                try:
                    if conn.value("SELECT pg_is_in_recovery()") == "f":
                        break
                except (OSError, PgError):
                    conn.close()
                    conn = None
                time.sleep(POLL)
            seconds = time.perf_counter() - started
            cpu = cpu_seconds() - cpu_started
            counts = conn.value(CHECK_SQL)
            conn.close()
        finally:
            cluster.stop()
            kill_strays(run_dir)
        logtext = cluster.log.read_text(errors="replace")
        if counts != t.counts:
            raise RuntimeError(f"{key}: recovered data {counts} differs from the original "
                               f"{t.counts}")
        if f'restored log file "{t.backlog[-1]}" from archive' not in logtext:
            raise RuntimeError(f"{key}: recovery did not replay {t.backlog[-1]}:\n"
                               f"{logtext[-3000:]}")
        pgcluster.remove_tree(data)
        return {"seconds": seconds, "cpu": cpu, "warm_seconds": warmed}

    # (d) ---------------------------------------------------------------------------------------
    def peak_rss(self, walship: Walship, pgbackrest: PgBackRestSync, barman: Barman) -> dict:
        """One push and one fetch per tool under /usr/bin/time -f %M, on a copy of the backlog
        (so walship's push-ahead does what it does under PostgreSQL). Detached helpers (walship's
        prefetch worker) are separate processes: their peak is read from /proc before they are
        stopped."""
        t = self.template
        run_dir = make_dir(self.work / "rss")
        data = run_dir / "data"
        copy_tree(t.data, data)
        sockdir = make_dir(run_dir / "sock")
        cluster = Cluster(data, sockdir, run_dir / "postgres.log")
        cluster.configure(unix_socket_directories=str(sockdir), archive_command="")
        first = t.backlog[0]
        out: dict = {}

        def timed(argv: list[str], env: dict, cwd: Path) -> int:
            proc = subprocess.run(["/usr/bin/time", "-f", "RSS_KIB=%M", *argv], env=env,
                                  cwd=cwd, capture_output=True, text=True,
                                  **pgcluster.as_postgres())
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                                   f"{proc.stderr[-2000:]}")
            return int(proc.stderr.rsplit("RSS_KIB=", 1)[1].split()[0])

        fetch_dir = make_dir(run_dir / "fetch")
        try:
            for tool in (walship, pgbackrest, barman):
                container = f"rss-{tool.key}"
                tool.create_repo(container)
                home = make_dir(run_dir / f"home-{tool.key}")
                env = tool.env(container, home)
                if tool is pgbackrest:
                    cluster.start(env=env)
                    tool.prepare(container, run_dir, data, sockdir)
                    cluster.stop()
                    push = ["sh", "-c", tool.archive_command(container, run_dir, data, sockdir)
                            .replace("%p", shlex.quote(str(data / "pg_wal" / first)))]
                    fetch_data = data
                    get = tool.restore_command(container, run_dir, data)
                else:
                    push = ["sh", "-c", tool.archive_command(container, run_dir, data, sockdir)
                            .replace("%p", shlex.quote(str(data / "pg_wal" / first)))]
                    fetch_data = make_dir(fetch_dir / tool.key)
                    make_dir(fetch_data / "pg_wal")
                    get = tool.restore_command(container, run_dir, fetch_data)
                push_kib = timed(push, env, data)
                pusher = None
                if tool is walship:
                    time.sleep(2)  # a background pusher it started works on the backlog
                    pusher = max([v or 0 for v in kill_strays(data).values()] + [0]) or None
                fetch_kib = timed(["sh", "-c", get.replace("%f", first)
                                   .replace("%p", "pg_wal/RECOVERYXLOG")], env, fetch_data)
                worker = None
                if tool is walship:
                    time.sleep(2)  # let the prefetch worker download its window
                    worker = max([v or 0 for v in kill_strays(fetch_data).values()] + [0]) or None
                if not filecmp.cmp(fetch_data / "pg_wal" / "RECOVERYXLOG",
                                   t.data / "pg_wal" / first, shallow=False):
                    raise RuntimeError(f"{tool.label}: fetched {first} differs")
                out[tool.key] = {"push_kib": push_kib, "fetch_kib": fetch_kib,
                                 "worker_kib": worker, "pusher_kib": pusher}
        finally:
            cluster.stop()
            kill_strays(run_dir)
        pgcluster.remove_tree(data)
        return out

    def build_plain_dir(self) -> None:
        """The floor of (c): the same segments in a plain directory, restored with cp."""
        self.plain_dir = make_dir(self.work / "plain-wal")
        for name in self.template.backlog:
            shutil.copy2(self.template.data / "pg_wal" / name, self.plain_dir / name)
        pgcluster.chown_tree(self.plain_dir)


# -- reporting --------------------------------------------------------------------------------
def cache_runs(results: dict) -> list[dict]:
    """The feed runs that sampled walship's prefetch cache (older result files sampled during
    the timed runs)."""
    runs = results.get("cache") or results["feed"].get("walship", [])
    return [r for r in runs if r.get("cache_max_bytes") is not None]


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine_info() -> dict:
    model = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release(), "os": _os_name()}


def _os_name() -> str:
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "walship"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" with uncommitted changes in walship/" if dirty else "")
    except OSError:
        return "?"


def fmt_samples(values: list[float], digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def cpu_column(runs: list[dict]) -> str:
    """Median CPU seconds the whole machine used during the runs (all processes: the tool,
    PostgreSQL, Azurite), out of 2 x the wall time available on two cores."""
    values = [r["cpu"] for r in runs if r.get("cpu") is not None]
    return f"{median(values):.2f}" if values else "-"


def render(results: dict, info: dict) -> tuple[str, str]:
    """(plain table for the terminal, markdown for docs/benchmarks.md)."""
    n = info["segments"]
    raw_mib = n * SEGMENT / 2**20
    labels = info["labels"]
    md: list[str] = []
    txt: list[str] = []

    def table(title: str, header: list[str], rows: list[list[str]]) -> None:
        md.append(f"### {title}\n")
        md.append("| " + " | ".join(header) + " |")
        md.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        for row in rows:
            md.append("| " + " | ".join(row) + " |")
        md.append("")
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        txt.append(title)
        for row in [header] + rows:
            txt.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                        for i, (c, w) in enumerate(zip(row, widths))))
        txt.append("")

    rows = target_rows(results, info)
    if rows:
        table("Targets (walship against peers measured in this run; speed ratio = peer's "
              "median time / walship's)", ["target", "measured", "goal", "result"], rows)

    drain = results["drain"]
    ws = median([r["seconds"] for r in drain["walship"]]) if "walship" in drain else None
    rows = []
    for key, runs in drain.items():
        secs = [r["seconds"] for r in runs]
        m = median(secs)
        rows.append([labels[key], f"{m:.2f}", f"{n / m:.1f}",
                     f"{m / ws:.2f}" if ws else "-", fmt_samples(secs), cpu_column(runs)])
    table(f"(a) Archive drain: {n} .ready segments ({raw_mib:.0f} MiB of WAL)",
          ["tool", "median s", "segments/s", "time vs walship", "runs (s)",
           "machine CPU s"], rows)

    feed = results["feed"]
    ws = median([r["seconds"] for r in feed["walship"]]) if "walship" in feed else None
    rows = []
    for key, runs in feed.items():
        secs = [r["seconds"] for r in runs]
        m = median(secs)
        rows.append([labels[key], f"{m:.2f}", f"{n / m:.1f}",
                     f"{median([r['call_median'] for r in runs]) * 1000:.0f}",
                     f"{max(r['call_max'] for r in runs) * 1000:.0f}",
                     f"{m / ws:.2f}" if ws else "-", fmt_samples(secs), cpu_column(runs)])
    table(f"(b) Restore feed: {n} segments, one restore_command at a time, in order",
          ["tool", "median s", "segments/s", "median ms/call", "max ms/call",
           "time vs walship", "runs (s)", "machine CPU s"], rows)

    rows = []
    for key, runs in feed.items():
        if not all("calls_cpu" in r for r in runs):
            continue  # (results from before this was measured)
        parts = {f: median([r[f] for r in runs]) for f in
                 ("cpu", "calls_cpu", "helpers_cpu", "server_cpu")}
        rest = parts["cpu"] - parts["calls_cpu"] - parts["helpers_cpu"] - parts["server_cpu"]
        rows.append([labels[key]] + [f"{parts[f] / n * 1000:.1f}" for f in
                                     ("cpu", "calls_cpu", "helpers_cpu", "server_cpu")]
                    + [f"{rest / n * 1000:.1f}"])
    if rows:
        table("(b) Where the CPU of a feed went, in ms per segment (medians of the runs)",
              ["tool", "machine", "calls (sh and the command)",
               "detached helpers (prefetch worker, async process)", "Azurite",
               "other (kernel threads, the harness, helpers that exited)"], rows)

    rec = results["recovery"]
    floor = median([r["seconds"] for r in rec["cp"]]) if "cp" in rec else None
    ws = median([r["seconds"] for r in rec["walship"]]) if "walship" in rec else None
    rows = []
    for key, runs in rec.items():
        secs = [r["seconds"] for r in runs]
        m = median(secs)
        rows.append([labels[key], f"{m:.2f}", f"{m / floor:.2f}" if floor else "-",
                     f"{m / ws:.2f}" if ws else "-", fmt_samples(secs), cpu_column(runs)])
    table(f"(c) Recovery: base backup + {info['replayed']} segments replayed, pg_ctl start "
          "until promoted", ["restore_command", "median s", "time vs cp", "time vs walship",
                             "runs (s)", "machine CPU s"], rows)

    rows = []
    for key, (blobs, size) in results["stored"].items():
        rows.append([labels[key], str(blobs), f"{size / 2**20:.1f}", f"{raw_mib / (size / 2**20):.2f}"])
    table(f"(d) Stored in Azurite for the {n} segments ({raw_mib:.0f} MiB)",
          ["tool", "blobs", "MiB stored", "compression ratio"], rows)

    rows = []
    for key, r in results["rss"].items():
        feed_peaks = [f.get("worker_rss_kib") or 0 for f in results.get("feed", {}).get(key, [])]
        rows.append([labels[key], f"{r['push_kib'] / 1024:.0f}", f"{r['fetch_kib'] / 1024:.0f}",
                     f"{r['pusher_kib'] / 1024:.0f}" if r.get("pusher_kib") else "-",
                     f"{r['worker_kib'] / 1024:.0f}" if r.get("worker_kib") else "-",
                     f"{max(feed_peaks) / 1024:.0f}" if key == "walship" and any(feed_peaks)
                     else "-"])
    if rows:
        table("Peak RSS of one call (MiB, /usr/bin/time -f %M) and of the helpers it starts",
              ["tool", "push", "fetch", "background pusher (separate process)",
               "prefetch worker (separate process)",
               "prefetch worker, largest over the feed runs of (b)"], rows)

    ws_feed = cache_runs(results)
    if ws_feed:
        rows = [[f"run {i}", f"{r['cache_max_bytes'] / 2**20:.1f}",
                 str(r["cache_max_segments"]), str(r["cache_samples"])]
                for i, r in enumerate(ws_feed, 1)]
        when = ("separate, untimed runs of (b)" if results.get("cache")
                else "the timed runs of (b)")
        table(f"walship prefetch cache during {when}: segment data (cached and partial), "
              "sampled every 10 ms (bound: prefetch = 8 segments = 128 MiB, cache_max_mb = "
              "1024)",
              ["feed run", "largest MiB seen", "most segment files at once", "samples"], rows)

    bk = results.get("backups")
    if bk:
        src = info["backup_source"]
        mb = src["bytes"] / 1e6
        meds = {k: {f: median([r[f] for r in runs]) for f in
                    ("push_seconds", "fetch_seconds", "push_rss_kib", "fetch_rss_kib",
                     "stored_bytes")} for k, runs in bk.items()}
        w = meds.get("walship")
        rows = []
        for key, runs in bk.items():
            m = meds[key]
            rows.append([info["backup_labels"][key], f"{m['push_seconds']:.2f}",
                         f"{mb / m['push_seconds']:.0f}",
                         f"{m['push_seconds'] / w['push_seconds']:.2f}" if w else "-",
                         fmt_samples([r["push_seconds"] for r in runs]),
                         f"{m['stored_bytes'] / 1e6:.1f}",
                         f"{m['push_rss_kib'] / 1024:.0f}"])
        table(f"(e) Base backup: pgbench scale {src['scale']}, {mb:.0f} MB in {src['files']} "
              "files (outside pg_wal), full backup", ["tool", "median s", "MB/s",
                                                      "time vs walship", "runs (s)",
                                                      "MB stored", "peak RSS MiB"], rows)
        rows = []
        for key, runs in bk.items():
            m = meds[key]
            rows.append([info["backup_labels"][key], f"{m['fetch_seconds']:.2f}",
                         f"{mb / m['fetch_seconds']:.0f}",
                         f"{m['fetch_seconds'] / w['fetch_seconds']:.2f}" if w else "-",
                         fmt_samples([r["fetch_seconds"] for r in runs]),
                         f"{m['fetch_rss_kib'] / 1024:.0f}"])
        table("(f) Restore of that backup into an empty directory",
              ["tool", "median s", "MB/s (source bytes)", "time vs walship", "runs (s)",
               "peak RSS MiB"], rows)
        rows = [[info["backup_labels"][key], runs[0].get("check", "-")]
                for key, runs in bk.items()]
        table("(g) Restored clusters checked (first run of each tool)",
              ["tool", "check"], rows)
    if results.get("drill"):
        drill_tables(results["drill"], info, table)
    return "\n".join(txt), "\n".join(md)


DRILL_LABELS = {"walship-drill-exec": "`walship drill`, exec to first query answered",
                "walship-drill": "`walship drill`, wall clock of the whole command",
                "walship-drill-rto": "`walship drill`, its own `rto_seconds`",
                "walship": "`walship backup-fetch` + recovery (harness)",
                "pgbackrest": "`pgbackrest restore` + recovery",
                "barman": "`barman-cloud-restore` + recovery (`barman-cloud-wal-restore`)"}


def drill_rows(drill: dict) -> dict[str, dict]:
    """Per row of (h): median total, restore and recovery seconds, and every run's total."""
    out: dict[str, dict] = {}
    for key, runs in drill.items():
        if key == "walship-drill":
            if all("exec_to_rto" in r for r in runs):
                totals = [r["exec_to_rto"] for r in runs]
                out["walship-drill-exec"] = {
                    "seconds": median(totals), "runs": totals,
                    "restore": median([r["before_start"] + r["phases"]["backup_fetch"]
                                       for r in runs]),
                    "recovery": median([r["rto_seconds"] - r["phases"]["backup_fetch"]
                                        for r in runs])}
            for row, field in (("walship-drill", "seconds"), ("walship-drill-rto", "rto_seconds")):
                totals = [r[field] for r in runs]
                out[row] = {"seconds": median(totals), "runs": totals,
                            "restore": median([r["phases"]["backup_fetch"] for r in runs]),
                            "recovery": median([r["rto_seconds"] - r["phases"]["backup_fetch"]
                                                for r in runs])}
        else:
            totals = [r["seconds"] for r in runs]
            out[key] = {"seconds": median(totals), "runs": totals,
                        "restore": median([r["fetch_seconds"] for r in runs]),
                        "recovery": median([r["recovery_seconds"] for r in runs])}
    return out


def drill_tables(drill: dict, info: dict, table) -> None:
    rows = drill_rows(drill)
    pgbr = rows.get("pgbackrest", {}).get("seconds")
    barman = rows.get("barman", {}).get("seconds")
    src = info["backup_source"]
    wal = info.get("drill_wal", {})
    segs = [w["bytes_after_backup"] / SEGMENT for w in wal.values()]
    body = []
    for key in ("walship-drill-exec", "walship-drill", "walship-drill-rto", "walship",
                "pgbackrest", "barman"):
        if key not in rows:
            continue
        r = rows[key]
        body.append([DRILL_LABELS[key], f"{r['seconds']:.2f}", f"{r['restore']:.2f}",
                     f"{r['recovery']:.2f}",
                     f"{r['seconds'] / pgbr:.2f}" if pgbr else "-",
                     f"{r['seconds'] / barman:.2f}" if barman else "-",
                     fmt_samples(r["runs"])])
    table(f"(h) Restore drill, RTO end to end: backup of pgbench scale {src['scale']} "
          f"({src['bytes'] / 1e6:.0f} MB) + "
          f"{min(segs, default=0):.1f}-{max(segs, default=0):.1f} segments of WAL after it, "
          "restored, replayed to the end of the archive, promoted, answering a query",
          ["how", "median s", "restore s", "recovery until promoted and answering s",
           "time vs pgBackRest", "time vs barman-cloud", "runs (s)"], body)
    if pgbr and "walship-drill" in rows:
        goal = []
        for key, what in (("walship-drill-exec", "exec to first query answered (like the "
                           "peers' rows)"), ("walship-drill", "wall clock of the whole command"),
                          ("walship-drill-rto", "its own `rto_seconds`")):
            if key in rows:
                ratio = rows[key]["seconds"] / pgbr
                goal.append([f"(h) `walship drill`, {what}, vs pgBackRest restore + recovery",
                             f"{ratio:.2f}x", "<= 0.5x", "met" if ratio <= 0.5 else "MISSED"])
        table("(h) Goal: walship's RTO at most half of pgBackRest's", ["target", "measured",
                                                                        "goal", "result"], goal)
    runs = drill.get("walship-drill", [])
    if runs and all("before_start" in r for r in runs):
        names = list(runs[0]["phases"])
        checks = list(runs[0]["checks"])
        header = (["before the drill's start (process, repository, choosing the backup)"]
                  + [f"phase {n}" for n in names]
                  + [f"check {c!r}" for c in checks]
                  + ["after the RTO, all (checks, stopping the server, storing the result)"])
        row = ([f"{median([r['before_start'] for r in runs]):.2f}"]
               + [f"{median([r['phases'][n] for r in runs]):.2f}" for n in names]
               + [f"{median([r['checks'][c] for r in runs]):.2f}" for c in checks]
               + [f"{median([r['after_rto'] for r in runs]):.2f}"])
        table("(h) Where `walship drill`'s wall clock goes (median s of each part)", header,
              [row])


def target_rows(results: dict, info: dict) -> list[list[str]]:
    """The issues' targets against this run's medians: [target, measured, goal, met?]."""
    rows: list[list[str]] = []

    def ratio(section: str, peer: str, goal: float | None, what: str) -> None:
        runs = results.get(section, {})
        if "walship" not in runs or peer not in runs:
            return
        w = median([r["seconds"] for r in runs["walship"]])
        p = median([r["seconds"] for r in runs[peer]])
        if goal is None:
            rows.append([what, f"{p / w:.2f}x", "(not a target)", "-"])
        else:
            rows.append([what, f"{p / w:.2f}x", f">= {goal}x",
                         "met" if p / w >= goal else "MISSED"])

    ratio("drain", "pgbackrest-async", 1.3, "(a) drain speed vs pgBackRest async")
    ratio("drain", "barman", 5, "(a) drain speed vs barman-cloud")
    ratio("feed", "pgbackrest-async", 1.0, "(b) restore feed speed vs pgBackRest async")
    ratio("feed", "barman", 10, "(b) restore feed speed vs barman-cloud")
    ratio("feed", "barman-parallel", None, "(b) restore feed speed vs barman-cloud --parallel 3")
    ratio("drain", "pgbackrest-sync", None, "(a) drain speed vs pgBackRest without async")
    rec = results.get("recovery", {})
    if "walship" in rec and "cp" in rec:
        w = median([r["seconds"] for r in rec["walship"]])
        c = median([r["seconds"] for r in rec["cp"]])
        rows.append(["(c) recovery time vs cp", f"{w / c:.3f}x", "<= 1.05x",
                     "met" if w / c <= 1.05 else "MISSED"])
    feed = results.get("feed", {})
    if "walship" in feed:
        rows.append(["(c) median time per restore_command call, walship",
                     f"{median([r['call_median'] for r in feed['walship']]) * 1000:.0f} ms",
                     "(reported)", "-"])
    stored = results.get("stored", {})
    if "walship" in stored and "pgbackrest-async" in stored:
        w, p = stored["walship"][1], stored["pgbackrest-async"][1]
        rows.append(["(d) stored WAL bytes vs pgBackRest (zst)",
                     f"{w / 2**20:.1f} vs {p / 2**20:.1f} MiB", "<=",
                     "met" if w <= p else "MISSED"])
    rss = results.get("rss", {}).get("walship")
    if rss:
        # the prefetch worker's peak over every feed run too (a whole feed, not 2 s of one)
        feed_workers = [r.get("worker_rss_kib") or 0
                        for r in results.get("feed", {}).get("walship", [])]
        for what, helper in (("push", "pusher"), ("fetch", "worker")):
            # the call's own peak, or the helper's it hands its work to, whichever is larger
            v = max([rss[f"{what}_kib"], rss.get(f"{helper}_kib") or 0]
                    + (feed_workers if helper == "worker" else [])) / 1024
            rows.append([f"(d) peak RSS of one wal-{what} (or the {helper} it starts)",
                         f"{v:.0f} MiB", "<= 100 MiB", "met" if v <= 100 else "MISSED"])
    if cache_runs(results):
        v = max(r["cache_max_bytes"] for r in cache_runs(results)) / 2**20
        rows.append(["(d) prefetch cache, largest seen (segment data)", f"{v:.1f} MiB",
                     "<= 128 MiB (window: 8 segments; cache_max_mb 1024)",
                     "met" if v <= 128 else "MISSED"])
    bk = results.get("backups")
    if bk and "walship" in bk:
        def med(key: str, field: str) -> float:
            return median([r[field] for r in bk[key]])
        w = med("walship", "push_seconds")
        peers = [k for k in bk if k != "walship"]
        if peers:
            fastest = min(peers, key=lambda k: med(k, "push_seconds"))
            r = med(fastest, "push_seconds") / w
            rows.append([f"(e) backup-push speed vs the faster peer "
                         f"({info['backup_labels'][fastest]})", f"{r:.2f}x", ">= 1.5x",
                         "met" if r >= 1.5 else "MISSED"])
        w = med("walship", "fetch_seconds")
        for peer in peers:
            r = med(peer, "fetch_seconds") / w
            rows.append([f"(f) backup-fetch speed vs {info['backup_labels'][peer]} restore",
                         f"{r:.2f}x", ">= 1.5x", "met" if r >= 1.5 else "MISSED"])
        for what in ("push", "fetch"):
            v = med("walship", f"{what}_rss_kib") / 1024
            rows.append([f"(e/f) peak RSS of backup-{what}", f"{v:.0f} MiB", "<= 200 MiB",
                         "met" if v <= 200 else "MISSED"])
    return rows


def write_doc(path: Path, markdown: str, info: dict, command: str) -> None:
    notes = kept_notes(path)
    v = info["versions"]
    m = info["machine"]
    if info["pgbackrest_verify_tls"]:
        tls = ("pgBackRest verifies it too (`repo1-storage-ca-file`); it connects to `localhost`, "
               "the certificate's DNS name, because its TLS client does not match IP addresses.")
    else:
        tls = ("pgBackRest runs with `repo1-storage-verify-tls=n` (its TLS client does not match "
               "IP addresses and `localhost` did not resolve to 127.0.0.1 here).")
    src = info.get("backup_source")
    backup_line = (f"one running pgbench cluster (scale {src['scale']}, {src['bytes'] / 1e6:.0f} MB "
                   f"in {src['files']} files outside pg_wal), backed up and restored by each tool "
                   "into the same Azurite." if src else "not measured in this run.")
    warm_mib = info.get("warm_mib", 0)
    warm_line = (f"""\
* **Warm memory**: right before every timed run (and every backup and restore of (e) and
  (f)), outside the timing, the harness writes and deletes a {warm_mib} MiB scratch file. This
  machine is a VM whose host takes back the memory the guest frees (free page reporting):
  the first write to such a page costs about 9 us (2.4 s per GiB), a page used a moment ago
  nothing. Without this, a run right after a fast run reused that run's freed page cache,
  while a run after barman-cloud's slow runs or after an idle wait paid the host: in a lab
  feed, 15 s idle before each run made pgBackRest's feed 1.98-2.31 s instead of 1.07-1.67 s
  and walship's 1.83-2.08 s instead of 1.29-1.34 s. The order rotates, but in (b) pgBackRest
  came right after walship in most rounds and walship never after pgBackRest. With the
  scratch file, both took 1.08-1.35 s after the same waits. (Before 2026-11-26 the harness
  did not do this.)""" if warm_mib else
                 "* **Warm memory**: off in this run (`--warm-mib 0`).")
    text = f"""# Benchmarks: walship, pgBackRest and barman-cloud

Measured by [`bench/run.py`](../bench/run.py) on {info['date']} (UTC), in one run against one
Azurite over HTTPS on 127.0.0.1, on the same real pgbench WAL for every tool. Every number below
was measured in that run; nothing is copied from elsewhere. Times are medians of
{info['repeat']} runs (each run listed); ratios are between medians of this run.

## Machine and versions

| | |
|---|---|
| CPU | {m['cpu']}, {m['cores']} cores (shared, noisy virtual machine) |
| memory | {m['memory_gib']} GiB |
| OS | {m['os']}, Linux {m['kernel']} |
| PostgreSQL | {v['postgresql']} |
| walship | {v['walship']} (commit {v['walship_commit']}) |
| pgBackRest | {v['pgbackrest']} (Debian package) |
| barman-cloud | {v['barman']} (barman[azure] from PyPI, own venv) |
| Azurite | {v['azurite']} (`--loose --skipApiVersionCheck`, HTTPS, self-signed certificate) |
| Python (harness) | {platform.python_version()} |

Reproduce (as root, on Debian 12; about {info['minutes']:.0f} minutes here):

```sh
{command}
```

## Results

WAL: {info['segments']} segments of 16 MiB written by pgbench (scale {info['scale']}, then
TPC-B-like runs with 2 clients) on PostgreSQL 15, the same bytes for every tool. The peers write
zstd level 3, walship its default (zstd level 1 with 5-byte minimum matches, tuned for WAL).
Base backups (e)-(g): {backup_line}

The machine is a shared virtual machine whose load the harness does not control, so single runs
are noisy: read the medians and the same-run ratios, not one run.

{markdown}
{notes}## Method

* **One Azurite** (blob service only, 127.0.0.1, HTTPS with a self-signed certificate, a fresh
  `--location`) serves all tools; each tool and run has its own container. The machine's two
  cores are shared by PostgreSQL, the tool, and Azurite (Node.js, single-threaded), so these
  numbers compare the tools under the same constraint; they are not absolute cloud throughput.
* **Backlog**: a cluster runs with `archive_mode = on` and an empty `archive_command`, so
  PostgreSQL marks every finished segment `.ready` and keeps it, while pgbench writes WAL. A base
  backup is taken part-way through with PostgreSQL's low-level API (`pg_backup_start` /
  `pg_backup_stop(wait_for_archive => false)`: `pg_basebackup -X none` would wait for the
  unarchived WAL), then pgbench goes on, `pg_switch_wal()` closes the last segment, and the
  server is stopped. This stopped cluster is the template for every run.
* **(a) Archive drain**: each run restores a copy of the template, starts it with archiving
  still off, lets the tool prepare its repository (pgBackRest: `stanza-create`), then sets the
  tool's `archive_command` (`ALTER SYSTEM` + `pg_reload_conf()`, the clock starts here) and polls
  `pg_stat_archiver` every 50 ms until `last_archived_wal` is the last `.ready` segment. Each
  run archives into a fresh container; the number of blobs stored is checked.
* **(b) Restore feed**: a Python loop runs each tool's `restore_command` through `sh -c` as the
  `postgres` user, the way PostgreSQL does (`%p` = `pg_wal/RECOVERYXLOG`, working directory a
  data directory with the template's `pg_control`), one segment at a time and in order, for
  every segment of the backlog, from the container that tool filled in run 1 of (a). Every
  restored file is compared byte for byte with the original. Detached helpers (walship's
  prefetch worker, pgBackRest's async process) are stopped after each run.
* **(c) Recovery**: the base backup is copied, `recovery.signal` and the tool's
  `restore_command` (`recovery_target_action = 'promote'`) are set, and the clock runs from
  `pg_ctl start` until `pg_is_in_recovery()` is false (polled every 50 ms). Recovery ends at the
  end of the archive. The recovered database is checked against the original (pgbench_history
  row count and sum of deltas, which is the sum of all balances), and the log must show the last
  segment restored.
  `cp` from a plain directory holding the same segments is the floor.
* **Settings**: walship as shipped (push-ahead 8, prefetch 8, parallel 3, compression level 1),
  only the repository,
  the connection string and the CA bundle set. pgBackRest with `archive-async=y`,
  `process-max=2`, `compress-type=zst`, `archive-get-queue-max=2GiB`, path-style URIs
  (plus an archive row without async). barman-cloud with `--zstd --compression-level 3`; its
  restore once at defaults and once with its read-ahead (`--parallel 3 --spool-dir`).
  PostgreSQL with `fsync = off` (the same for all; the tools' own writes are not affected).
* **Machine CPU s**: CPU time the whole machine used during a run (all processes: the tool,
  PostgreSQL, Azurite, the harness), from `/proc/stat`. Two cores give at most twice the wall
  time: a run near that is CPU-bound, and the tool that needs less CPU per segment wins. For
  (b) it is split: the calls (CPU of the harness's children: `sh` and the tool's command), the
  detached helpers still running at the end of the run (`/proc/PID/stat`), Azurite's node
  process, and the rest.
{warm_line}
* **TLS**: all over HTTPS. walship and barman-cloud verify Azurite's certificate (given as
  `REQUESTS_CA_BUNDLE` / `SSL_CERT_FILE`). {tls}
* **Peak RSS**: `/usr/bin/time -f %M` around one push and one fetch per tool (pgBackRest without
  async). walship's push runs in a `pg_wal` holding the backlog, so its push-ahead works as
  under PostgreSQL; its fetch starts the detached prefetch worker, whose own peak is read from
  `/proc` before it is stopped, as it is at the end of every feed run of (b): the target takes
  the largest of them all. `%M` is the peak of the largest single process (for pgBackRest
  with `process-max=2` and barman-cloud with `-J 2`, of one of its processes, not their sum;
  walship's commands are one process with threads).
* **Prefetch cache bound**: after the timed runs of (b), walship's feed runs again as many
  times, untimed, while a thread lists `pg_wal/walship/prefetch/` every 10 ms and sums the sizes
  of its files (sealed segments and partial downloads); the largest sum is reported against the
  window (`prefetch` = 8 segments of 16 MiB) and `cache_max_mb` (1024). (Until 2026-11-26 the
  sampler ran during the timed runs, taking CPU from the run it watched.)
* **(e) Base backup**: one cluster (`pgbench -i -s SCALE`, then `VACUUM ANALYZE` and a
  checkpoint, with archiving off; then restarted with `archive_mode = on`) stays up for all
  backups. Before each tool's backup the harness waits until no segment is `.ready` and switches
  `archive_command` to that tool's (each tool archives the WAL its backup needs into its own
  container: walship's `wal-push`, pgBackRest's async `archive-push`, barman-cloud's
  `barman-cloud-wal-archive --zstd`). Timed from outside, start to exit: `walship backup-push`
  (defaults: `parallel` 3, 64 MiB parts, zstd 3, fast checkpoint); `pgbackrest backup
  --type=full` (`compress-type=zst`, level 3, `process-max=2`, `start-fast=y`, expiry kept out
  of the way with `repo1-retention-full=99`); `barman-cloud-backup -J 2 --lz4
  --immediate-checkpoint` (lz4: the fastest compression barman-cloud-backup 3.19 offers; it has
  gzip, bzip2, snappy and lz4 for base backups, no zstd). Stored bytes are the blobs each backup
  added to its container outside the tool's WAL prefix. Throughput (MB/s) is the source
  cluster's bytes outside `pg_wal` divided by the time, the same numerator for every tool.
* **(f) Restore**: into a new empty directory on the same disk: `walship backup-fetch LATEST DIR`
  (every part checked against the digest the manifest records, every file against its size,
  then one `syncfs`), `pgbackrest restore --pg1-path=DIR` (`process-max=2`),
  `barman-cloud-restore URL SERVER ID DIR` (the ID looked up first with
  `barman-cloud-backup-list`, outside the timing). Every restore starts as on a fresh server:
  before it, outside the timing, the harness runs `sync` and empties the page cache
  (`/proc/sys/vm/drop_caches`). Restored directories are deleted only when the section ends,
  and the section starts 61 s after the harness last deleted anything (so do (b) and (c),
  whose helpers create files for every segment). The reason: this
  machine's root filesystem is ext4 without a journal, which does not reuse an inode deleted
  within the last 60 s and scans past every such inode when it creates a file, so a restore
  run right after deleting the previous one (977 files) took 1.10-1.22 s instead of
  0.59-0.63 s for walship: a cost of whichever tool came next, not of the tool.
* **(g) Check**: the first restore of each tool is started as a server with that tool's own
  `restore_command`, `recovery.signal`, `recovery_target = 'immediate'` and
  `recovery_target_action = 'promote'`; once promoted it must answer
  `SELECT count(*) || '/' || sum(abalance) FROM pgbench_accounts` exactly as the source did.
* **(h) Restore drill**: each tool takes one more backup with its own `archive_command` on, then
  pgbench writes `--drill-wal` segments (default 8) more, archived by that tool; timed per tool
  and run, from nothing on disk to a restored server that replayed its archive to the end,
  promoted and answered a query: `walship drill` (exec to first query answered, its own
  `rto_seconds`, and the wall clock of the whole command) and each tool's restore followed by
  recovery with its `restore_command` (see `bench/backups.py`). `--only drill` runs just this.
"""
    path.write_text(text)


NOTES_HEADING = "## What the figures say"


def kept_notes(path: Path) -> str:
    """The hand-written analysis section of the existing report (between its heading and
    "## Method"), carried over into the new report: it is edited by hand after a run."""
    try:
        old = path.read_text()
    except FileNotFoundError:
        return ""
    start = old.find(NOTES_HEADING)
    end = old.find("## Method", start)
    return old[start:end] if start >= 0 and end > start else ""


DRILL_BEGIN = "<!-- drill-rto: written by bench/run.py --only drill -->"
DRILL_END = "<!-- drill-rto: end -->"


def drill_only(args, work: Path, walship: Walship, pgbr: PgBackRest, barman: Barman,
               info: dict, began: float) -> int:
    """``--only drill``: the backup cluster, one backup per tool and the drill (h); the section
    is written into the existing report (between DRILL_BEGIN and DRILL_END, else before the
    notes), the rest of the report left as it was."""
    backups = BackupBench(args, work, walship, pgbr, barman, log, kill_strays)
    res: dict = {}
    try:
        info["backup_source"] = backups.build(args.backup_scale)
        info["backup_labels"] = {t.key: t.label for t in backups.tools}
        info["drill_wal"] = backups.prepare_drill(args.drill_wal)
        info["drill_segments"] = args.drill_wal
        res["drill"] = backups.run_drill(args.repeat)
    finally:
        backups.close()
    info["minutes"] = (time.monotonic() - began) / 60
    md: list[str] = []
    txt: list[str] = []

    def table(title: str, header: list[str], rows: list[list[str]]) -> None:
        md.append(f"### {title}\n")
        md.append("| " + " | ".join(header) + " |")
        md.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        md.extend("| " + " | ".join(row) + " |" for row in rows)
        md.append("")
        txt.append(title)
        txt.extend("  " + "  ".join(row) for row in [header] + rows)
        txt.append("")

    drill_tables(res["drill"], info, table)
    print("\n".join(txt))
    command = ("WALSHIP_VENV=/opt/walship-bench-venv bash bench/setup.sh && "
               "/opt/walship-bench-venv/bin/python bench/run.py --only drill"
               + (f" --repeat {args.repeat}" if args.repeat != 5 else "")
               + (f" --backup-scale {args.backup_scale}" if args.backup_scale != 30 else "")
               + (f" --drill-wal {args.drill_wal}" if args.drill_wal != 8 else ""))
    info["command"] = command
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": res}, indent=2))
    if args.no_docs:
        log("docs not written (--no-docs)")
    else:
        write_drill_section(args.docs, "\n".join(md), info, command)
        log(f"wrote the drill section of {args.docs}")
    log(f"done in {info['minutes']:.1f} minutes")
    return 0


def write_drill_section(path: Path, markdown: str, info: dict, command: str) -> None:
    v, m = info["versions"], info["machine"]
    section = f"""{DRILL_BEGIN}
## Restore drill: RTO end to end, against pgBackRest and barman-cloud

Measured by `bench/run.py --only drill` on {info['date']} (UTC), in one run against one Azurite
over HTTPS on 127.0.0.1, separately from the run above (about {info['minutes']:.0f} minutes):
{m['cpu']}, {m['cores']} cores (shared with other work: a noisy machine), {m['memory_gib']} GiB,
{m['os']}; PostgreSQL {v['postgresql']}, walship {v['walship'].removeprefix('walship ')} (commit
{v['walship_commit']}), pgBackRest {v['pgbackrest']}, barman-cloud {v['barman']}, Azurite
{v['azurite']}. Times are medians of {info['repeat']} runs per row (each run listed); ratios are
between medians of this run.

```sh
{command}
```

{markdown}
How (see `bench/backups.py`): one running pgbench cluster; for each tool in turn, its
`archive_command` on, one full backup (untimed; walship `backup-push`, `pgbackrest --type=full
backup`, `barman-cloud-backup --lz4 -J 2`), then pgbench (2 clients, 2000 transactions at a
time) until at least {info['drill_segments']} segments of WAL more were written, `pg_switch_wal()` and everything archived by that tool: the
repository holds the backup, the WAL it needs and WAL after it, so every RTO below includes
replaying that WAL to the end of the archive. Before every timed run, outside the timing: the
page cache is emptied and memory warmed (as in (f)); the order of the rows rotates between
runs. Timed, start to finish:

* **`walship drill`** (`--json --keep --scratch DIR`, `[drill] checksums = false`, checks
  `SELECT 1` then `pgbench_accounts` against the source), three figures of each run: *exec to
  first query answered*, the like-for-like with the other rows (the time from exec to the
  drill's start, read from the `started` of its JSON against the harness's clock when it
  executed the command, plus its `rto_seconds`); its own `rto_seconds` (drill start to the
  first check answered: it leaves out the process start, opening the repository and choosing
  the backup); and the wall clock of the whole command, exec to exit (also the second check,
  stopping the scratch server and storing the result in the repository; `--keep` leaves the
  stopped scratch directory, so its deletion is not timed, as for the other rows).
* **restore + recovery** (walship `backup-fetch LATEST DIR`, `pgbackrest restore
  --pg1-path=DIR`, `barman-cloud-restore URL SERVER ID DIR`, the ID looked up with
  `barman-cloud-backup-list` inside the timing, as an operator must): the restore, then
  `recovery.signal`, the tool's `restore_command` (`walship wal-fetch`, `pgbackrest
  archive-get` with its async archive-get, `barman-cloud-wal-restore`),
  `recovery_target_action = 'promote'`, `pg_ctl start`, and polling every 50 ms until
  `pg_is_in_recovery()` is false on a connection that answered. Each run then checks
  `count(*)` and `sum(abalance)` of `pgbench_accounts` against the source when that tool's WAL
  was archived.

{DRILL_END}
"""
    text = path.read_text()
    start, end = text.find(DRILL_BEGIN), text.find(DRILL_END)
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(DRILL_END) + 1:]
    else:
        at = text.find(NOTES_HEADING)
        at = at if at >= 0 else len(text)
        text = text[:at] + section + "\n" + text[at:]
    path.write_text(text)


# -- main -------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Side-by-side benchmark of walship, pgBackRest and barman-cloud on one "
                    "Azurite (HTTPS). Run bench/setup.sh first.",
        epilog="Example: bash bench/setup.sh && /opt/walship-venv/bin/python bench/run.py")
    p.add_argument("--segments", type=int, default=64,
                   help="WAL segments in the backlog (default 64)")
    p.add_argument("--replay", type=int, default=32,
                   help="segments the recovery (c) replays, at least (default 32)")
    p.add_argument("--scale", type=int, default=30, help="pgbench -i scale (default 30)")
    p.add_argument("--repeat", type=int, default=5,
                   help="runs of each timed measurement; medians are reported (default 5: "
                   "this shared machine is noisy)")
    p.add_argument("--quick", action="store_true",
                   help="development: 16 segments, 8 replayed, --repeat 1, no docs written")
    p.add_argument("--walship", default=str(Path(sys.executable).parent / "walship"),
                   help="walship executable (default: the one beside this Python)")
    p.add_argument("--barman-venv", type=Path, default=DEFAULT_CERT_DIR / "barman")
    p.add_argument("--cert", type=Path, default=DEFAULT_CERT_DIR / "cert.pem")
    p.add_argument("--key", type=Path, default=DEFAULT_CERT_DIR / "key.pem")
    p.add_argument("--azurite-bin", default=None,
                   help="azurite-blob (default $WALSHIP_AZURITE_BIN, /opt/walship-azurite)")
    p.add_argument("--no-sync-row", action="store_true",
                   help="skip the pgBackRest archive row without async")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md",
                   help="where to write the report (default docs/benchmarks.md)")
    p.add_argument("--no-docs", action="store_true", help="do not write the report")
    p.add_argument("--json", type=Path, help="also write the raw results as JSON")
    p.add_argument("--warm-mib", type=int, default=1536, metavar="MIB",
                   help="before every timed run, write and delete a scratch file this large "
                        "so that every run starts with warm memory (see "
                        "pgcluster.warm_memory; 0: off; default 1536)")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds allowed for one drain or recovery (default 600)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--walship-baseline", metavar="EXE",
                   help="also measure this other walship executable in (a)-(c), as a baseline "
                        "(e.g. the code before a change, installed in its own venv)")
    p.add_argument("--walship-baseline-label", default="walship baseline",
                   help="its label in the tables")
    p.add_argument("--render-json", type=Path, metavar="FILE",
                   help="write the report from the JSON of an earlier run (--json) and exit")
    p.add_argument("--no-backups", action="store_true",
                   help="skip the base backup measurements (e), (f)")
    p.add_argument("--backup-scale", type=int, default=30,
                   help="pgbench -i scale of the cluster backed up in (e) (default 30)")
    p.add_argument("--only", choices=["drill"],
                   help="drill: measure only the restore drill (h) (RTO end to end: backup, "
                        "restore, WAL replay until promoted and answering) and write it as its "
                        "own section of the report, leaving the rest of the report as it is")
    p.add_argument("--drill-wal", type=int, default=8, metavar="SEGMENTS",
                   help="segments of WAL archived after each tool's backup, replayed by the "
                        "drill (h) (default 8)")
    p.add_argument("--no-drill", action="store_true", help="skip the restore drill (h)")
    p.add_argument("--walship-file-repo", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.segments, args.replay, args.repeat = 16, 8, 1
        args.backup_scale = min(args.backup_scale, 10)
    if args.replay >= args.segments - 2:
        p.error("--replay must leave at least 2 segments before the base backup")
    return args


def main() -> int:
    args = parse_args()
    if args.render_json:
        saved = json.loads(args.render_json.read_text())
        info, res = saved["info"], saved["results"]
        text, markdown = render(res, info)
        print(text)
        if not args.no_docs:
            write_doc(args.docs, markdown, info, info["command"])
            log(f"wrote {args.docs} from {args.render_json}")
        return 0
    if os.geteuid() != 0:
        raise SystemExit("run as root: servers run as the postgres user")
    for path, what in [(args.cert, "certificate"), (args.key, "key"),
                       (args.barman_venv / "bin" / "barman-cloud-wal-archive", "barman-cloud")]:
        if not path.exists():
            raise SystemExit(f"{what} {path} missing: run bench/setup.sh")
    pgbackrest = shutil.which("pgbackrest")
    if not pgbackrest:
        raise SystemExit("pgbackrest missing: run bench/setup.sh")
    run_pg([args.walship, "--version"])  # the postgres user must be able to run it

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    work = Path(tempfile.mkdtemp(prefix="walship-bench-", dir="/tmp"))
    make_dir(work)
    began = time.monotonic()
    azurite = Azurite(find_binary(args.azurite_bin), work / "azurite" / "data", args.cert,
                      args.key)
    log(f"work directory {work}")
    try:
        azurite.start()
        log(f"Azurite {azurite.version()} on https://127.0.0.1:{azurite.port}")
        ctx = Context(azurite=azurite, cert=args.cert, walship=args.walship,
                      barman_bin=args.barman_venv / "bin", pgbackrest=pgbackrest)
        walship, pgbr, pgbr_sync, barman = Walship(ctx), PgBackRest(ctx), PgBackRestSync(ctx), \
            Barman(ctx)
        barman_par = BarmanParallel(ctx)
        if args.walship_file_repo:  # development only: walship not on Azurite, no docs
            walship.file_root = make_dir(work / "walship-file-repo")
            args.no_docs = True
        baseline = None
        if args.walship_baseline:
            baseline = WalshipBaseline(ctx, args.walship_baseline)
            baseline.label = args.walship_baseline_label
        bench = Bench(args, work, azurite, ctx)
        info = {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "machine": machine_info(),
            "versions": {"walship": walship.version(), "walship_commit": git_revision(),
                         "pgbackrest": pgbr.version(), "barman": barman.version(),
                         "postgresql": subprocess.run([str(BIN / "postgres"), "--version"],
                                                      capture_output=True, text=True)
                         .stdout.strip().replace("postgres (PostgreSQL) ", ""),
                         "azurite": azurite.version()},
            "repeat": args.repeat, "scale": args.scale, "warm_mib": args.warm_mib,
            "pgbackrest_verify_tls": PgBackRest.verify_tls(),
            "labels": {t.key: t.label for t in (walship, pgbr, pgbr_sync, barman, barman_par,
                                                 *([baseline] if baseline else []))}
            | {"cp": "cp from a directory (floor)"},
        }
        log("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
        if args.only == "drill":
            return drill_only(args, work, walship, pgbr, barman, info, began)
        bench.template = build_template(work, args.segments, args.replay, args.scale)
        info["segments"] = len(bench.template.backlog)
        info["replayed"] = len(bench.template.replayed)
        bench.build_plain_dir()
        res = bench.results

        extra: list[Tool] = [baseline] if baseline else []
        drain_tools = [walship, *extra, pgbr] + ([] if args.no_sync_row else [pgbr_sync]) + \
            [barman]
        for r in range(1, args.repeat + 1):
            # rotate the order between runs, so no tool always runs first on a cold cache
            order = drain_tools[(r - 1) % len(drain_tools):] + \
                drain_tools[:(r - 1) % len(drain_tools)]
            for tool in order:
                out = bench.drain(tool, r)
                res["drain"].setdefault(tool.key, []).append(out)
                log(f"(a) drain {tool.label} run {r}: {out['seconds']:.2f} s "
                    f"(machine CPU {out['cpu']:.2f} s), "
                    f"{out['blobs']} blobs, {out['bytes'] / 2**20:.1f} MiB, "
                    f"{out['failed']} failed calls")
        res["drain"] = {t.key: res["drain"][t.key] for t in drain_tools}
        res["stored"] = {t.key: (res["drain"][t.key][0]["blobs"], res["drain"][t.key][0]["bytes"])
                         for t in drain_tools}

        feed_tools = [walship, *extra, pgbr, barman, barman_par]
        pgcluster.settle_removals(log)  # (the drain runs deleted thousands of files)
        for r in range(1, args.repeat + 1):
            k = (r - 1) % len(feed_tools)
            order = feed_tools[k:] + feed_tools[:k]
            for tool in order:
                out = bench.feed(tool, r)
                res["feed"].setdefault(tool.key, []).append(out)
                log(f"(b) feed {tool.label} run {r}: {out['seconds']:.2f} s "
                    f"(machine CPU {out['cpu']:.2f} s), median call "
                    f"{out['call_median'] * 1000:.0f} ms, {out['verified']} files identical")
        res["feed"] = {t.key: res["feed"][t.key] for t in feed_tools}
        res["cache"] = []
        for r in range(1, args.repeat + 1):
            out = bench.feed(walship, r, sample=True)
            res["cache"].append(out)
            log(f"(d) prefetch cache, sampled feed run {r}: largest "
                f"{out['cache_max_bytes'] / 2**20:.1f} MiB, {out['cache_samples']} samples")

        rec_tools: list[Tool | None] = [None, walship, *extra, pgbr, barman, barman_par]
        pgcluster.settle_removals(log)
        for r in range(1, args.repeat + 1):
            k = (r - 1) % len(rec_tools)
            order = rec_tools[k:] + rec_tools[:k]
            for tool in order:
                out = bench.recovery(tool, r)
                key = tool.key if tool else "cp"
                res["recovery"].setdefault(key, []).append(out)
                log(f"(c) recovery {info['labels'][key]} run {r}: {out['seconds']:.2f} s "
                    f"(machine CPU {out['cpu']:.2f} s)")
        res["recovery"] = {k: res["recovery"][k] for k in
                           ["cp", "walship", *[t.key for t in extra], "pgbackrest-async",
                            "barman", "barman-parallel"]}

        res["rss"] = bench.peak_rss(walship, pgbr_sync, barman)

        if not args.no_backups:
            backups = BackupBench(args, work, walship, pgbr, barman, log, kill_strays)
            try:
                info["backup_source"] = backups.build(args.backup_scale)
                info["backup_labels"] = {t.key: t.label for t in backups.tools}
                res["backups"] = backups.run(args.repeat)
                if not args.no_drill:
                    info["drill_wal"] = backups.prepare_drill(args.drill_wal)
                    info["drill_segments"] = args.drill_wal
                    res["drill"] = backups.run_drill(args.repeat)
            finally:
                backups.close()
        info["minutes"] = (time.monotonic() - began) / 60
        text, markdown = render(res, info)
        print()
        print(text)
        command = ("WALSHIP_VENV=/opt/walship-bench-venv bash bench/setup.sh && "
                   "/opt/walship-bench-venv/bin/python bench/run.py")
        extra = [f"--segments {args.segments}" if args.segments != 64 else "",
                 f"--replay {args.replay}" if args.replay != 32 else "",
                 f"--scale {args.scale}" if args.scale != 30 else "",
                 f"--repeat {args.repeat}" if args.repeat != 5 else "",
                 "--no-sync-row" if args.no_sync_row else "",
                 f"--backup-scale {args.backup_scale}" if args.backup_scale != 30 else "",
                 "--no-backups" if args.no_backups else "",
                 f"--drill-wal {args.drill_wal}" if args.drill_wal != 8 else "",
                 "--no-drill" if args.no_drill else "",
                 (f"--walship-baseline {args.walship_baseline} --walship-baseline-label "
                  f"{shlex.quote(args.walship_baseline_label)}") if args.walship_baseline else ""]
        command = " ".join([command, *filter(None, extra)])
        info["command"] = command
        if args.json:
            args.json.write_text(json.dumps({"info": info, "results": res}, indent=2))
        if args.quick or args.no_docs:
            log("docs not written (--quick or --no-docs)")
        else:
            write_doc(args.docs, markdown, info, command)
            log(f"wrote {args.docs}")
        log(f"done in {info['minutes']:.1f} minutes")
        return 0
    finally:
        pgcluster.stop_all()
        kill_strays(work)
        azurite.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
