"""Base backups side by side (issue 4): walship backup-push / backup-fetch, pgBackRest backup /
restore and barman-cloud-backup / barman-cloud-restore, of the same running pgbench cluster into
the same Azurite (HTTPS), each run timed from the outside, with its peak RSS (/usr/bin/time %M).

One server (pgbench -i at --scale, archive_mode on) serves every backup. Before a tool's backup
its archive_command is switched on (ALTER SYSTEM + reload) and the harness waits until no
segment is left .ready, so that each tool archives the WAL its own backup needs (pgBackRest and
walship wait for it at the end of a backup; barman-cloud-backup too). Each tool keeps one
container for all its runs; the bytes a backup stored are the blobs it added outside the WAL
prefix.

Restores go into an empty directory on the same filesystem. The first restore of each tool is
checked: the restored cluster is started with the tool's own restore_command,
recovery_target = 'immediate' and promoted, and must answer ``SELECT count(*) FROM
pgbench_accounts`` with scale * 100000 rows (and the sum of abalance the source had).

The restore drill (``--only drill``, or after (e)-(g) in a full run) measures each tool's RTO
the way an operator meets it: from nothing on disk to a restored server that has replayed the
archive to its end, promoted, and answers a query. Each tool takes one backup (untimed) with
its own archive_command on, then pgbench writes ``--drill-wal`` segments more, archived by that
tool: the WAL recovery replays after the backup's own. Timed, per tool and run (order rotated,
page cache emptied and memory warmed first, as for (f)): ``walship drill`` end to end (its own
``rto_seconds`` and the wall clock of the command), and for every tool its restore command
(``walship backup-fetch``, ``pgbackrest restore``, ``barman-cloud-restore``), then
``recovery.signal``, the tool's restore_command, ``pg_ctl start`` and polling (every 50 ms)
until ``pg_is_in_recovery()`` is false and the server answers. Every run checks
``pgbench_accounts`` against the source as it was when that tool's last segment was archived.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pgcluster
from peers import BARMAN_SERVER, LEVEL, Barman, PgBackRest, Tool, Walship
from pgcluster import BIN, Cluster, make_dir, run_pg
from pgwire import Connection, PgError

BARMAN_COMPRESSION = "lz4"  # fastest of what barman-cloud-backup 3.19 offers (no zstd there)
ACCOUNTS_SQL = "SELECT count(*) || '/' || sum(abalance) FROM pgbench_accounts"
SEGMENT = 16 * 2**20
POLL = 0.05


def tree_bytes(path: Path, skip: tuple[str, ...] = ("pg_wal",)) -> tuple[int, int]:
    """(files, bytes) under ``path``, top-level ``skip`` directories excluded."""
    files = total = 0
    for root, dirs, names in os.walk(path):
        if Path(root) == path:
            dirs[:] = [d for d in dirs if d not in skip]
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            files += 1
            total += st.st_size
    return files, total


def timed_rss(argv: list[str], env: dict[str, str], cwd: str = "/",
              timeout: float = 900) -> tuple[float, int, str]:
    """Run ``argv`` as postgres under /usr/bin/time: (wall seconds, peak RSS KiB, stderr)."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "RSS_KIB=%M", *argv], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          **pgcluster.as_postgres())
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                           f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    rss = int(proc.stderr.rsplit("RSS_KIB=", 1)[1].split()[0])
    return seconds, rss, proc.stderr


class BackupTool:
    key = label = ""
    wal_prefix = ""      # blobs under this prefix are archived WAL, not the backup

    def __init__(self, tool: Tool, work: Path, sockdir: Path, data: Path) -> None:
        self.tool, self.work, self.sockdir, self.data = tool, work, sockdir, data
        self.container = f"bk-{self.key}"
        self.home = make_dir(work / f"home-{self.key}")

    @property
    def azurite(self):
        return self.tool.ctx.azurite

    def env(self) -> dict[str, str]:
        env = self.tool.env(self.container, self.home)
        env.update(PGHOST=str(self.sockdir), PGPORT="5432", PGUSER="postgres",
                   PGDATABASE="postgres")
        return env

    def setup(self, cluster: Cluster) -> None:
        self.azurite.create_container(self.container)

    def archive_command(self) -> str:
        raise NotImplementedError

    def blobs(self) -> dict[str, int]:
        client = self.azurite._service().get_container_client(self.container)
        return {b.name: b.size for b in client.list_blobs()}

    def push(self) -> tuple[float, int, str]:
        raise NotImplementedError

    def fetch(self, target: Path) -> tuple[float, int, str]:
        raise NotImplementedError

    def restore_command(self, target: Path) -> str:
        raise NotImplementedError


class WalshipBackup(BackupTool):
    key, label, wal_prefix = "walship", "walship", "cluster/wal/"

    def archive_command(self) -> str:
        return f"{shlex.quote(self.tool.ctx.walship)} wal-push %p"

    def push(self):
        return timed_rss([self.tool.ctx.walship, "backup-push"], self.env())

    def fetch(self, target):
        return timed_rss([self.tool.ctx.walship, "backup-fetch", "LATEST", str(target)],
                         self.env())

    def restore_command(self, target):
        return f"{shlex.quote(self.tool.ctx.walship)} wal-fetch %f %p"


class PgBackRestBackup(BackupTool):
    key, label, wal_prefix = "pgbackrest", "pgBackRest", "repo/archive/"

    def setup(self, cluster):
        super().setup(cluster)
        peer: PgBackRest = self.tool  # type: ignore[assignment]
        self.run_dir = make_dir(self.work / "pgbackrest")
        peer.write_config(self.container, self.run_dir, self.data, self.sockdir)
        conf = peer.config_path(self.run_dir)
        # keep every full backup (expiring is not what is measured); start with a fast
        # checkpoint like the others
        text = conf.read_text().replace("repo1-retention-full=1", "repo1-retention-full=99")
        conf.write_text(text.replace("[global]\n", "[global]\nstart-fast=y\n", 1))
        run_pg(["sh", "-c", f"{peer.base(self.run_dir)} stanza-create"], env=self.env())

    def archive_command(self) -> str:
        return f"{self.tool.base(self.run_dir)} archive-push %p"  # type: ignore[attr-defined]

    def push(self):
        return timed_rss(["sh", "-c", f"{self.tool.base(self.run_dir)} --type=full backup"],
                         self.env())

    def fetch(self, target):
        return timed_rss(["sh", "-c", f"{self.tool.base(self.run_dir)} "
                          f"--pg1-path={shlex.quote(str(target))} restore"], self.env())

    def restore_command(self, target):
        return (f"{self.tool.base(self.run_dir)} "
                f"--pg1-path={shlex.quote(str(target))} archive-get %f \"%p\"")


class BarmanBackup(BackupTool):
    key, label, wal_prefix = "barman", f"barman-cloud (-J 2, --{BARMAN_COMPRESSION})", \
        f"{BARMAN_SERVER}/wals/"

    def bin(self, name: str) -> str:
        return str(self.tool.ctx.barman_bin / name)

    def url(self) -> str:
        return self.tool.url(self.container)  # type: ignore[attr-defined]

    def archive_command(self) -> str:
        return " ".join(map(shlex.quote, [
            self.bin("barman-cloud-wal-archive"), "--cloud-provider", "azure-blob-storage",
            "--zstd", "--compression-level", str(LEVEL), self.url(), BARMAN_SERVER])) + " %p"

    def push(self):
        return timed_rss([self.bin("barman-cloud-backup"), "--cloud-provider",
                          "azure-blob-storage", f"--{BARMAN_COMPRESSION}", "-J", "2",
                          "--immediate-checkpoint", "-h", str(self.sockdir), "-p", "5432",
                          "-U", "postgres", self.url(), BARMAN_SERVER], self.env())

    def latest(self) -> str:
        out = run_pg([self.bin("barman-cloud-backup-list"), "--cloud-provider",
                      "azure-blob-storage", "--format", "json", self.url(), BARMAN_SERVER],
                     env=self.env()).stdout
        backups = [b for b in json.loads(out)["backups_list"] if b.get("status") == "DONE"]
        return sorted(backups, key=lambda b: b["end_time"] or "")[-1]["backup_id"]

    def fetch(self, target):
        backup_id = self.latest()  # not timed: the others look their latest up inside
        return timed_rss([self.bin("barman-cloud-restore"), "--cloud-provider",
                          "azure-blob-storage", self.url(), BARMAN_SERVER, backup_id,
                          str(target)], self.env())

    def restore_command(self, target):
        return " ".join(map(shlex.quote, [
            self.bin("barman-cloud-wal-restore"), "--cloud-provider", "azure-blob-storage",
            self.url(), BARMAN_SERVER])) + " %f %p"


class BackupBench:
    def __init__(self, args, work: Path, walship: Walship, pgbackrest: PgBackRest,
                 barman: Barman, log, kill_strays) -> None:
        self.args, self.log, self.kill_strays = args, log, kill_strays
        self.work = make_dir(work / "backups")
        self.sockdir = make_dir(self.work / "sock")
        self.data = self.work / "data"
        self.tools = [WalshipBackup(walship, self.work, self.sockdir, self.data),
                      PgBackRestBackup(pgbackrest, self.work, self.sockdir, self.data),
                      BarmanBackup(barman, self.work, self.sockdir, self.data)]
        self.cluster: Cluster | None = None
        self.conn: Connection | None = None
        self.restored: list[Path] = []

    # -- the source cluster --------------------------------------------------------------------
    def build(self, scale: int) -> dict:
        started = time.monotonic()
        cluster = Cluster.initdb(self.data, self.sockdir, self.work / "postgres.log")
        cluster.base_settings()
        # pgbench -i without archiving (its WAL is not what is measured), then archiving on.
        cluster.configure(archive_mode=False, max_wal_size="1GB", min_wal_size="80MB",
                          wal_keep_size=0)
        cluster.start()
        run_pg([str(BIN / "pgbench"), "-h", str(self.sockdir), "-U", "postgres", "-i", "-q",
                "-s", str(scale), "postgres"])
        cluster.psql("VACUUM ANALYZE")
        cluster.psql("CHECKPOINT")
        cluster.stop()
        cluster.configure(archive_mode=True, archive_command="", log_min_messages="log")
        env = {}
        for tool in self.tools:  # one environment serves every tool's archive_command
            env.update(tool.env())
        cluster.start(env=env)
        self.cluster = cluster
        self.conn = cluster.connect()
        self.expected = self.conn.value(ACCOUNTS_SQL)
        for tool in self.tools:
            tool.setup(cluster)
        files, size = tree_bytes(self.data)
        info = {"files": files, "bytes": size, "scale": scale, "expected": self.expected,
                "seconds": time.monotonic() - started,
                "db_bytes": int(self.conn.value(
                    "SELECT sum(pg_database_size(oid)) FROM pg_database"))}
        self.log(f"backups: source cluster scale {scale}: {files} files, "
                 f"{size / 1e6:.0f} MB outside pg_wal, {info['seconds']:.0f} s")
        return info

    def use_archiver(self, tool: BackupTool) -> None:
        """Switch archive_command to ``tool``'s, once nothing is left .ready."""
        assert self.conn is not None
        self.wait_archived()
        self.conn.query("ALTER SYSTEM SET archive_command = '"
                        + tool.archive_command().replace("'", "''") + "'")
        self.conn.query("SELECT pg_reload_conf()")
        time.sleep(0.3)

    def wait_archived(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while pgcluster.ready_segments(self.data):
            if time.monotonic() > deadline:
                raise RuntimeError("WAL of the backup cluster is not archived:\n"
                                   + (self.cluster.log_tail() if self.cluster else ""))
            time.sleep(0.1)

    # -- one tool, one run ---------------------------------------------------------------------
    def run_once(self, tool: BackupTool, repeat: int, validate: bool) -> dict:
        self.use_archiver(tool)
        before = tool.blobs()
        pgcluster.warm_memory(self.work, self.args.warm_mib)
        push_s, push_rss, _ = tool.push()
        after = tool.blobs()
        added = {k: v for k, v in after.items()
                 if k not in before and not k.startswith(tool.wal_prefix)}
        target = self.work / f"restore-{tool.key}-{repeat}"
        make_dir(target)
        os.chmod(target, 0o700)
        pgcluster.cold_cache()
        pgcluster.warm_memory(self.work, self.args.warm_mib)
        fetch_s, fetch_rss, _ = tool.fetch(target)
        files, restored = tree_bytes(target)
        out = {"push_seconds": push_s, "push_rss_kib": push_rss, "fetch_seconds": fetch_s,
               "fetch_rss_kib": fetch_rss, "stored_bytes": sum(added.values()),
               "stored_blobs": len(added), "restored_files": files,
               "restored_bytes": restored}
        if validate:
            out["check"] = self.validate(tool, target)
        # Kept until the section ends (see pgcluster.settle_removals: deleting it now would
        # slow down the file creations of the next tool's restore), and flushed, so that its
        # writeback does not run during the next timed command.
        self.restored.append(target)
        os.sync()
        return out

    def validate(self, tool: BackupTool, target: Path) -> str:
        """Start the restored cluster (recovery to the end of the backup with the tool's own
        restore_command, then promote) and compare pgbench_accounts with the source."""
        self.wait_archived()
        sock = make_dir(target.parent / f"sock-{target.name}")
        cluster = Cluster(target, sock, target.parent / f"{target.name}.log")
        cluster.configure(unix_socket_directories=str(sock), archive_mode=False,
                          archive_command="", restore_command=tool.restore_command(target),
                          recovery_target="immediate", recovery_target_action="promote",
                          log_min_messages="warning")
        (target / "recovery.signal").touch()
        pgcluster.chown_tree(target)
        try:
            cluster.start(env=tool.env())
            conn = cluster.connect()
            deadline = time.monotonic() + 120
            while conn.value("SELECT pg_is_in_recovery()") != "f":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{tool.label}: restored cluster did not promote")
                time.sleep(0.1)
            got = conn.value(ACCOUNTS_SQL)
            conn.close()
        finally:
            cluster.stop()
            self.kill_strays(target)  # the tools' detached helpers (prefetch worker)
        if got != self.expected:
            raise RuntimeError(f"{tool.label}: restored cluster has {got} in pgbench_accounts,"
                               f" the source {self.expected}")
        shutil.rmtree(sock, ignore_errors=True)
        return (f"started, recovered to consistency with its restore_command, promoted; "
                f"pgbench_accounts count/sum(abalance) = {got} as in the source")

    def run(self, repeat: int) -> dict:
        results: dict[str, list[dict]] = {t.key: [] for t in self.tools}
        pgcluster.settle_removals(self.log)
        for r in range(1, repeat + 1):
            order = self.tools[(r - 1) % 3:] + self.tools[:(r - 1) % 3]
            for tool in order:
                out = self.run_once(tool, r, validate=(r == 1))
                results[tool.key].append(out)
                self.log(f"(e) backup {tool.label} run {r}: push {out['push_seconds']:.2f} s "
                         f"({out['push_rss_kib'] / 1024:.0f} MiB RSS), fetch "
                         f"{out['fetch_seconds']:.2f} s ({out['fetch_rss_kib'] / 1024:.0f} MiB"
                         f" RSS), {out['stored_bytes'] / 1e6:.1f} MB stored in "
                         f"{out['stored_blobs']} blobs"
                         + (f"; check: {out['check']}" if "check" in out else ""))
        return results

    # -- the restore drill: RTO end to end ------------------------------------------------------
    def prepare_drill(self, segments: int) -> dict:
        """Each tool: its backup (untimed) with its archive_command on, then ``segments`` of
        pgbench WAL archived by it; the source's pgbench_accounts when that WAL was archived."""
        assert self.conn is not None and self.cluster is not None
        self.drill_expected: dict[str, str] = {}
        self.drill_wal: dict[str, dict] = {}
        for tool in self.tools:
            self.use_archiver(tool)
            seconds, _, _ = tool.push()
            start = self.conn.value("SELECT pg_current_wal_lsn()::text")
            self.write_wal(segments * SEGMENT)
            end = self.conn.value("SELECT pg_walfile_name(pg_switch_wal())")
            self.wait_archived()
            written = int(self.conn.value(f"SELECT pg_current_wal_lsn() - '{start}'::pg_lsn"))
            self.drill_expected[tool.key] = self.conn.value(ACCOUNTS_SQL)
            self.drill_wal[tool.key] = {"bytes_after_backup": written, "last_wal": end,
                                        "backup_seconds": seconds}
            self.log(f"drill: {tool.label} backup taken ({seconds:.1f} s), then "
                     f"{written / SEGMENT:.1f} segments of WAL archived up to {end}")
        return self.drill_wal

    def write_wal(self, size: int) -> None:
        assert self.conn is not None
        start = self.conn.value("SELECT pg_current_wal_lsn()::text")
        deadline = time.monotonic() + 600
        while int(self.conn.value(f"SELECT pg_current_wal_lsn() - '{start}'::pg_lsn")) < size:
            if time.monotonic() > deadline:
                raise RuntimeError("pgbench did not write the drill's WAL in 10 minutes")
            run_pg([str(BIN / "pgbench"), "-h", str(self.sockdir), "-U", "postgres", "-n",
                    "-c", "2", "-t", "2000", "postgres"])

    def drill_walship(self, repeat: int) -> dict:
        """``walship drill`` end to end, timed from outside; its own report read back."""
        tool = self.tools[0]
        assert isinstance(tool, WalshipBackup)
        config = self.work / "drill.toml"
        if not config.exists():
            config.write_text(
                '[drill]\nchecksums = false\n\n[[drill.check]]\nname = "answers"\n'
                'sql = "SELECT 1"\n\n[[drill.check]]\nname = "pgbench_accounts"\n'
                f'sql = "{ACCOUNTS_SQL}"\nvalue = "{self.drill_expected[tool.key]}"\n')
            os.chmod(config, 0o644)
        scratch = self.work / f"drill-scratch-{repeat}"
        env = {**tool.env(), "WALSHIP_CONFIG": str(config)}
        pgcluster.cold_cache()
        pgcluster.warm_memory(self.work, self.args.warm_mib)
        exec_at = time.time()
        started = time.perf_counter()
        proc = subprocess.run([self.tool_exe(), "drill", "--json", "--keep", "--scratch",
                               str(scratch)], env=env, cwd=str(self.work), capture_output=True,
                              text=True, timeout=self.args.timeout, **pgcluster.as_postgres())
        wall = time.perf_counter() - started
        self.restored.append(scratch)
        self.kill_strays(scratch)
        if proc.returncode != 0:
            raise RuntimeError(f"walship drill exited {proc.returncode}:\n"
                               f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        report = json.loads(proc.stdout)
        checks = {c["name"]: c for c in report["checks"]}
        if not checks["pgbench_accounts"]["passed"]:
            raise RuntimeError(f"walship drill: {checks['pgbench_accounts']['detail']}")
        os.sync()
        # The drill's start (its RTO's zero) on the wall clock, against when it was executed:
        # what it did before (process start, opening the repository, choosing the backup).
        before = dt.datetime.fromisoformat(report["started"]).timestamp() - exec_at
        return {"seconds": wall, "rto_seconds": report["rto_seconds"],
                "before_start": before, "exec_to_rto": before + report["rto_seconds"],
                "after_rto": wall - before - report["rto_seconds"],
                "checks": {c["name"]: c["seconds"] for c in report["checks"]},
                "phases": report["phases"], "check": checks["pgbench_accounts"]["detail"]}

    def tool_exe(self) -> str:
        return self.tools[0].tool.ctx.walship

    def drill_manual(self, tool: BackupTool, repeat: int) -> dict:
        """The tool's restore, then recovery to the end of its archive until promoted and
        answering, timed from the restore's start."""
        target = self.work / f"drill-{tool.key}-{repeat}"
        make_dir(target)
        os.chmod(target, 0o700)
        sock = make_dir(self.work / f"drill-sock-{tool.key}-{repeat}")
        pgcluster.cold_cache()
        pgcluster.warm_memory(self.work, self.args.warm_mib)
        self.restored.append(target)
        started = time.perf_counter()
        fetch_s, _, _ = tool.fetch(target)
        cluster = Cluster(target, sock, self.work / f"drill-{tool.key}-{repeat}.log")
        cluster.configure(unix_socket_directories=str(sock), archive_mode=False,
                          archive_command="", restore_command=tool.restore_command(target),
                          recovery_target_action="promote", hot_standby=True,
                          log_min_messages="log")
        (target / "recovery.signal").touch()
        pgcluster.chown_tree(target)
        conn = None
        try:
            cluster.start(env=tool.env(), wait=False)
            t_started = time.perf_counter()
            deadline = started + self.args.timeout
            while True:
                now = time.perf_counter()
                if now > deadline:
                    raise RuntimeError(f"{tool.label}: recovery did not end:\n"
                                       f"{cluster.log_tail()}")
                if now - t_started > 3 and not (target / "postmaster.pid").exists():
                    raise RuntimeError(f"{tool.label}: the server stopped:\n"
                                       f"{cluster.log_tail()}")
                if conn is None:
                    try:
                        conn = Connection(str(sock), timeout=5)
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
            got = conn.value(ACCOUNTS_SQL)
        finally:
            if conn is not None:
                conn.close()
            cluster.stop()
            self.kill_strays(target)
        if got != self.drill_expected[tool.key]:
            raise RuntimeError(f"{tool.label}: pgbench_accounts {got} after recovery, the "
                               f"source had {self.drill_expected[tool.key]} when its WAL "
                               "was archived")
        os.sync()
        return {"seconds": seconds, "fetch_seconds": fetch_s,
                "recovery_seconds": seconds - (t_started - started),
                "check": f"pgbench_accounts count/sum(abalance) = {got} as in the source"}

    def run_drill(self, repeat: int) -> dict:
        """Medians are taken by the report; every run is kept."""
        rows: list[tuple[str, object]] = [("walship-drill", None)] + \
            [(t.key, t) for t in self.tools]
        results: dict[str, list[dict]] = {key: [] for key, _ in rows}
        pgcluster.settle_removals(self.log)
        for r in range(1, repeat + 1):
            k = (r - 1) % len(rows)
            for key, tool in rows[k:] + rows[:k]:
                if tool is None:
                    out = self.drill_walship(r)
                    self.log(f"(h) drill walship drill run {r}: wall {out['seconds']:.2f} s, "
                             f"rto_seconds {out['rto_seconds']:.2f} s, phases {out['phases']}")
                else:
                    out = self.drill_manual(tool, r)  # type: ignore[arg-type]
                    self.log(f"(h) drill {tool.label} run {r}: {out['seconds']:.2f} s "  # type: ignore[union-attr]
                             f"(restore {out['fetch_seconds']:.2f} s)")
                results[key].append(out)
        for key, runs in results.items():
            self.log(f"(h) {key}: median {statistics.median(r['seconds'] for r in runs):.2f} s")
        return results

    def close(self) -> None:
        for target in self.restored:
            pgcluster.remove_tree(target)
        self.restored.clear()
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.cluster is not None:
            self.cluster.stop()
