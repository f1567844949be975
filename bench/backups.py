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
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pgcluster
from peers import BARMAN_SERVER, LEVEL, Barman, PgBackRest, Tool, Walship
from pgcluster import BIN, Cluster, make_dir, run_pg
from pgwire import Connection

BARMAN_COMPRESSION = "lz4"  # fastest of what barman-cloud-backup 3.19 offers (no zstd there)
ACCOUNTS_SQL = "SELECT count(*) || '/' || sum(abalance) FROM pgbench_accounts"


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

    def close(self) -> None:
        for target in self.restored:
            pgcluster.remove_tree(target)
        self.restored.clear()
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.cluster is not None:
            self.cluster.stop()
