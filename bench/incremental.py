"""Incremental and differential backups side by side (issue 16, Speed): walship ``backup-push
--type incr|diff`` against pgBackRest ``--type=incr|diff``, in one run on one Azurite (HTTPS),
each tool in its own container, from the same running pgbench cluster. pgBackRest runs twice:
as configured by default (file-level: a changed file is stored whole), and, unless
--no-pgbackrest-block, with ``repo1-bundle=y`` + ``repo1-block=y`` (its block incremental,
"FOR BETA TESTING ONLY" in 2.45's help); the issue's goals are against the first.

    bash bench/setup.sh && /opt/walship-bench-venv/bin/python bench/incremental.py \\
        --scale 70 --rounds 3 --walship /opt/walship-bench-venv/bin/walship

--pg-bindir runs the cluster (and pgbench) from another PostgreSQL, --summarize-wal sets
``summarize_wal = on`` (PostgreSQL 17+: walship's incr/diff then read only the blocks the WAL
summaries name; its log line saying so is shown), --no-pgbackrest leaves pgBackRest out (2.45
cannot back up PostgreSQL 18: "unexpected control version = 1800").

One source cluster (pgbench -i at --scale: 70 is about 1.1 GB; autovacuum off, so that nothing
but pgbench changes pages between the measurements and the backups). Every round:

1. a full backup by each tool (walship ``backup-push --type full``, ``pgbackrest --type=full
   backup``), timed;
2. the pages of every file outside pg_wal are hashed (8 KiB blocks); pgbench (2 clients, the
   default TPC-B-like script, no vacuum) runs in steps, each followed by a CHECKPOINT and the
   same hashing, until at least --touch (default 5%) of the blocks differ from the hashes taken
   after the full backups (a new block, or a block of a new file, counts as changed). The
   changed blocks themselves, per file concatenated in block order and compressed as one zstd
   frame per file, give the reference "compressed size of the changed blocks" (zstd level 3,
   the peers' level; level 1 is shown too);
3. an incremental backup by each tool, then a differential one (both relative to the same full
   backup here, so both hold the same changes);
4. the full+incr chain of each tool restored into an empty directory (walship ``backup-fetch
   NAME``, ``pgbackrest restore --set=LABEL``; the name/label looked up before the timing),
   after emptying the page cache and warming memory (as bench/backups.py does). In round 1 each
   restored cluster is started (recovery to the end of its backup with the tool's own
   restore_command, then promoted) and must answer ``count(*)``/``sum(abalance)`` of
   pgbench_accounts as the source did when the incr was taken.

Measured per backup (from outside, as the postgres user):

* wall time (and peak RSS, /usr/bin/time %M; and the CPU time the whole machine used meanwhile,
  from /proc/stat: tool, PostgreSQL and Azurite);
* bytes read, from the kernel's I/O accounting of the whole process tree: the harness reads
  its own /proc/self/io before and after the command; the counters of a reaped child (and of
  the children it reaped) are added to its parent's, so the difference covers the tool and
  every helper process it started and waited for (pgBackRest's ``process-max`` workers).
  ``read_bytes`` is what the tree caused to be fetched from the block device: right before
  every backup the data directory (and only it) is written back and evicted from the page cache
  (``posix_fadvise(DONTNEED)`` on each file) and the tools' own files (walship's venv and
  Python's standard library, pgbackrest, the shared libraries of both) are read into it, so it
  is the data-directory bytes the tool read. (A page PostgreSQL writes back during the backup,
  at its starting checkpoint, is read from the cache and not counted: a few MB at most here.)
  ``rchar`` (bytes returned by read() and the like, cached or not) is shown too, but counts the
  pipes between pgBackRest's processes and the HTTP responses as well, so it is not the
  data-directory figure. (walship reads every file: it proves a file unchanged by its
  SHA-256; pgBackRest's incr/diff, without --delta, reads only the files whose size or
  modification time changed);
* stored bytes: the container is listed before and after; the growth of every blob outside
  the WAL prefix (walship ``cluster/wal/``, pgBackRest ``repo/archive/``).

Every tool archives all the WAL all the time, each into its own repository, as in production
(an incremental backup that reads its changes from the WAL, as walship's does on PostgreSQL
before 17, needs the WAL since its parent in its repository once the checkpoints have recycled
it): archive_command is the tools' archive commands joined with ``&&``, the tool about to back
up first (switched with ALTER SYSTEM + reload, once nothing is .ready), so the segment its
backup waits for reaches its repository first. (Until 2026-12-06 only the tool about to back up
archived, as bench/backups.py does; walship's repository then lacked the WAL archived while the
others' backups ran.) The order of the tools alternates between rounds. Tables show medians over rounds
(each round listed). Everything runs under /tmp/walship-incr-* and is removed afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
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
from backups import ACCOUNTS_SQL, PgBackRestBackup, WalshipBackup, timed_rss, tree_bytes  # noqa: E402
from peers import Context, PgBackRest, Walship  # noqa: E402
from pgcluster import Cluster, make_dir, run_pg  # noqa: E402
from run import (DEFAULT_CERT_DIR, NOTES_HEADING, cpu_seconds, git_revision,  # noqa: E402
                 kill_strays, log, machine_info)

REPO = HERE.parent
BLOCK = 8192
MB = 1e6
SECTION_BEGIN = "<!-- incremental: written by bench/incremental.py -->"
SECTION_END = "<!-- incremental: end -->"
SKIP_TOP = {"pg_wal", "pg_stat_tmp", "pg_replslot", "pg_snapshots", "pg_notify",
            "pg_dynshmem", "pg_subtrans", "pg_serial", "pg_stat"}
SKIP_FILES = {"postmaster.pid", "postmaster.opts", "postgresql.auto.conf",
              "postgresql.auto.conf.tmp", "pg_internal.init"}
KINDS = ("full", "incr", "diff")


# -- process-tree I/O ------------------------------------------------------------------------
def self_io() -> dict[str, int]:
    """This process's /proc/self/io: its own reads plus those of every child it reaped (and
    theirs, recursively)."""
    out = {}
    with open("/proc/self/io") as handle:
        for line in handle:
            key, value = line.split(":")
            out[key] = int(value)
    return out


def evict(directory: Path) -> None:
    """Write back everything, then drop ``directory``'s files (only them) from the page cache."""
    os.sync()
    for root, dirs, names in os.walk(directory):
        for name in names:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def tool_files(walship: str, pgbackrest: str) -> list[str]:
    """The files the two tools run from: walship's venv and its interpreter's standard library,
    pgbackrest, and every shared library these load (ldd). Read before each backup (see
    :func:`prewarm`), so that the bytes a backup reads from the block device are the data
    directory's, not the tool's own code left cold by an earlier page-cache drop."""
    venv = Path(walship).parent.parent
    python = venv / "bin" / "python"
    stdlib = subprocess.run([str(python), "-c", "import sysconfig; "
                             "print(sysconfig.get_paths()['stdlib'])"],
                            capture_output=True, text=True).stdout.strip()
    roots = [venv] + ([Path(stdlib)] if stdlib else [])
    files: set[str] = set()
    objects = [pgbackrest, os.path.realpath(python), "/usr/bin/time", os.path.realpath("/bin/sh")]
    for root in roots:
        for directory, dirs, names in os.walk(root):
            for name in names:
                path = os.path.join(directory, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    files.add(path)
                    if ".so" in name:
                        objects.append(path)
    for i in range(0, len(objects), 200):
        out = subprocess.run(["ldd", *objects[i:i + 200]], capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            if "=>" in line and "/" in line.split("=>", 1)[1]:
                files.add(os.path.realpath(line.split("=>", 1)[1].split("(")[0].strip()))
    files.update(os.path.realpath(o) for o in objects)
    return sorted(files)


def prewarm(files: list[str]) -> None:
    for path in files:
        try:
            with open(path, "rb", buffering=0) as handle:
                while handle.read(1 << 20):
                    pass
        except OSError:
            pass


def measured(argv: list[str], env: dict[str, str]) -> dict:
    before = self_io()
    cpu0 = cpu_seconds()
    seconds, rss, stderr = timed_rss(argv, env, timeout=3600)
    cpu = cpu_seconds() - cpu0
    after = self_io()
    return {"seconds": seconds, "rss_kib": rss, "cpu": cpu,
            "read_bytes": after["read_bytes"] - before["read_bytes"],
            "rchar": after["rchar"] - before["rchar"], "stderr": stderr[-2000:]}


# -- the changed pages -----------------------------------------------------------------------
def data_files(data: Path):
    for root, dirs, names in os.walk(data):
        if Path(root) == data:
            dirs[:] = [d for d in dirs if d not in SKIP_TOP]
        for name in names:
            if name in SKIP_FILES or name.startswith("pgsql_tmp"):
                continue
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            yield os.path.relpath(path, data), path


def block_hashes(data: Path) -> dict[str, list[bytes]]:
    """Per file outside pg_wal (and PostgreSQL's runtime directories): an 8-byte BLAKE2b of each
    8 KiB block."""
    out: dict[str, list[bytes]] = {}
    for rel, path in data_files(data):
        digests = []
        try:
            with open(path, "rb") as handle:
                while block := handle.read(BLOCK):
                    digests.append(hashlib.blake2b(block, digest_size=8).digest())
        except FileNotFoundError:
            continue
        out[rel] = digests
    return out


def count_changed(before: dict[str, list[bytes]], after: dict[str, list[bytes]]) -> dict:
    total = sum(len(d) for d in after.values())
    changed = files = 0
    for rel, digests in after.items():
        old = before.get(rel, [])
        n = sum(1 for i, d in enumerate(digests) if i >= len(old) or old[i] != d)
        if n:
            changed += n
            files += 1
    return {"blocks": total, "changed_blocks": changed, "changed_files": files,
            "fraction": changed / total if total else 0.0}


def changed_reference(data: Path, before: dict[str, list[bytes]]) -> dict:
    """The changed blocks (against ``before``) compressed with zstd, one frame per file of its
    changed blocks in block order, at levels 3 and 1; and the changed files whole (what a
    file-level incremental has to store) compressed at level 3."""
    import zstandard

    l3, l1 = zstandard.ZstdCompressor(level=3), zstandard.ZstdCompressor(level=1)
    out = {"changed_bytes": 0, "zstd3": 0, "zstd1": 0, "files_bytes": 0, "files_zstd3": 0,
           "changed_blocks": 0, "changed_files": 0, "blocks": 0}
    for rel, path in data_files(data):
        try:
            content = Path(path).read_bytes()
        except FileNotFoundError:
            continue
        old = before.get(rel, [])
        blocks = [content[i:i + BLOCK] for i in range(0, len(content), BLOCK)]
        out["blocks"] += len(blocks)
        picked = [b for i, b in enumerate(blocks)
                  if i >= len(old) or old[i] != hashlib.blake2b(b, digest_size=8).digest()]
        if not picked:
            continue
        joined = b"".join(picked)
        out["changed_blocks"] += len(picked)
        out["changed_files"] += 1
        out["changed_bytes"] += len(joined)
        out["zstd3"] += len(l3.compress(joined))
        out["zstd1"] += len(l1.compress(joined))
        out["files_bytes"] += len(content)
        out["files_zstd3"] += len(l3.compress(content))
    out["fraction"] = out["changed_blocks"] / out["blocks"] if out["blocks"] else 0.0
    return out


# -- the tools -------------------------------------------------------------------------------
class WalshipIncr(WalshipBackup):
    key, label, wal_prefix = "walship", "walship", "cluster/wal/"

    def push_kind(self, kind: str) -> list[str]:
        return [self.tool.ctx.walship, "backup-push", "--type", kind]

    def newest(self) -> tuple[str, str]:
        """The newest complete backup's name and type."""
        out = run_pg([self.tool.ctx.walship, "backup-list", "--json"], env=self.env()).stdout
        row = [r for r in json.loads(out) if r.get("complete")][-1]  # names sort by start
        return row["name"], row["type"]

    def fetch_argv(self, name: str, target: Path) -> list[str]:
        return [self.tool.ctx.walship, "backup-fetch", name, str(target)]


class PgBackRestIncr(PgBackRestBackup):
    key, label, wal_prefix = "pgbackrest", "pgBackRest", "repo/archive/"

    def push_kind(self, kind: str) -> list[str]:
        return ["sh", "-c", f"{self.tool.base(self.run_dir)} --type={kind} backup"]

    def newest(self) -> tuple[str, str]:
        out = run_pg(["sh", "-c", f"{self.tool.base(self.run_dir)} --output=json info"],
                     env=self.env()).stdout
        row = json.loads(out)[0]["backup"][-1]  # oldest first
        return row["label"], row["type"]

    def fetch_argv(self, name: str, target: Path) -> list[str]:
        return ["sh", "-c", f"{self.tool.base(self.run_dir)} --set={shlex.quote(name)} "
                f"--pg1-path={shlex.quote(str(target))} restore"]


class PgBackRestBlock(PgBackRestIncr):
    """pgBackRest with its block incremental (``repo1-bundle=y``, ``repo1-block=y`` and the
    ``beta=y`` it requires; 2.45's help: "FOR BETA TESTING ONLY"), in its own container and
    configuration."""

    key, label = "pgbackrest-block", "pgBackRest block (beta)"

    def setup(self, cluster):
        self.azurite.create_container(self.container)
        peer: PgBackRest = self.tool  # type: ignore[assignment]
        self.run_dir = make_dir(self.work / "pgbackrest-block")
        peer.write_config(self.container, self.run_dir, self.data, self.sockdir)
        conf = peer.config_path(self.run_dir)
        text = conf.read_text().replace("repo1-retention-full=1", "repo1-retention-full=99")
        conf.write_text(text.replace("[global]\n", "[global]\nstart-fast=y\nrepo1-bundle=y\n"
                                     "repo1-block=y\nbeta=y\n", 1))
        run_pg(["sh", "-c", f"{peer.base(self.run_dir)} stanza-create"], env=self.env())


class IncrBench:
    def __init__(self, args, work: Path, walship: Walship, pgbackrest: PgBackRest) -> None:
        self.args = args
        self.work = make_dir(work / "incr")
        self.sockdir = make_dir(self.work / "sock")
        self.data = self.work / "data"
        self.tools = [WalshipIncr(walship, self.work, self.sockdir, self.data)]
        if not args.no_pgbackrest:
            self.tools.append(PgBackRestIncr(pgbackrest, self.work, self.sockdir, self.data))
        if not args.no_pgbackrest and not args.no_pgbackrest_block:
            self.tools.append(PgBackRestBlock(pgbackrest, self.work, self.sockdir, self.data))
        self.cluster: Cluster | None = None
        self.conn = None
        self.restored: list[Path] = []
        self.transactions = 0  # pgbench transactions that reached --touch in the last round
        self.tool_files = tool_files(walship.ctx.walship, pgbackrest.ctx.pgbackrest)

    def build(self, scale: int) -> dict:
        started = time.monotonic()
        cluster = Cluster.initdb(self.data, self.sockdir, self.work / "postgres.log")
        cluster.base_settings()
        cluster.configure(archive_mode=False, max_wal_size="1GB", min_wal_size="80MB",
                          wal_keep_size=0, autovacuum=False)
        cluster.start()
        run_pg([str(pgcluster.BIN / "pgbench"), "-h", str(self.sockdir), "-U", "postgres", "-i", "-q",
                "-s", str(scale), "postgres"], timeout=3600)
        cluster.psql("VACUUM ANALYZE")
        cluster.psql("CHECKPOINT")
        cluster.stop()
        cluster.configure(archive_mode=True, archive_command="", log_min_messages="log")
        if self.args.summarize_wal:  # PostgreSQL 17+: walship's incr/diff read the summaries
            cluster.configure(summarize_wal=True)
        env = {}
        for tool in self.tools:
            env.update(tool.env())
        cluster.start(env=env)
        self.cluster = cluster
        self.conn = cluster.connect()
        for tool in self.tools:
            tool.setup(cluster)
        files, size = tree_bytes(self.data)
        info = {"files": files, "bytes": size, "scale": scale,
                "seconds": time.monotonic() - started}
        log(f"source cluster scale {scale}: {files} files, {size / MB:.0f} MB outside pg_wal, "
            f"built in {info['seconds']:.0f} s")
        return info

    # -- archiving, as bench/backups.py -------------------------------------------------------
    def wait_archived(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while pgcluster.ready_segments(self.data):
            if time.monotonic() > deadline:
                raise RuntimeError("WAL not archived:\n" + self.cluster.log_tail())
            time.sleep(0.1)

    def use_archiver(self, tool) -> None:
        """Every tool archives, ``tool`` first (see the module docstring)."""
        self.wait_archived()
        command = " && ".join(t.archive_command()
                              for t in [tool] + [t for t in self.tools if t is not tool])
        self.conn.query("ALTER SYSTEM SET archive_command = '"
                        + command.replace("'", "''") + "'")
        self.conn.query("SELECT pg_reload_conf()")
        time.sleep(0.3)

    # -- one backup -------------------------------------------------------------------------
    def backup(self, tool, kind: str) -> dict:
        self.use_archiver(tool)
        before = tool.blobs()
        prewarm(self.tool_files)
        evict(self.data)
        pgcluster.warm_memory(self.work, self.args.warm_mib)
        out = measured(tool.push_kind(kind), tool.env())
        after = tool.blobs()
        grown = {k: v - before.get(k, 0) for k, v in after.items()
                 if not k.startswith(tool.wal_prefix) and v != before.get(k)}
        out["stored_bytes"] = sum(grown.values())
        out["stored_blobs"] = sum(1 for k in grown if k not in before)
        out["name"], taken = tool.newest()
        if taken != kind:
            raise RuntimeError(f"{tool.label} took a {taken} backup for --type {kind}:\n"
                               f"{out['stderr']}")
        return out

    def touch(self, snapshot: dict[str, list[bytes]]) -> dict:
        """pgbench in steps until at least --touch of the blocks changed."""
        total = sum(len(d) for d in snapshot.values())
        target = self.args.touch
        step = self.transactions or max(200, int(total * target * 0.45))
        done = 0
        steps = []
        t0 = time.monotonic()
        while True:
            per_client = max(1, step // 2)
            run_pg([str(pgcluster.BIN / "pgbench"), "-h", str(self.sockdir), "-U", "postgres", "-n",
                    "-c", "2", "-j", "2", "-t", str(per_client), "postgres"], timeout=3600)
            done += 2 * per_client
            self.conn.query("CHECKPOINT")
            got = count_changed(snapshot, block_hashes(self.data))
            steps.append((done, got["fraction"]))
            log(f"  pgbench {done} transactions: {got['changed_blocks']} of {got['blocks']} "
                f"blocks changed ({got['fraction']:.2%})")
            if got["fraction"] >= target * 0.95 or len(steps) >= 12:
                break
            rate = got["fraction"] / done if got["fraction"] else 0
            missing = (target - got["fraction"]) / rate if rate else done
            step = max(100, int(missing * 1.05))
        self.transactions = done
        return {"transactions": done, "steps": steps, "seconds": time.monotonic() - t0}

    def restore(self, tool, name: str, r: int) -> dict:
        target = self.work / f"restore-{tool.key}-{r}"
        make_dir(target)
        os.chmod(target, 0o700)
        pgcluster.cold_cache()
        pgcluster.warm_memory(self.work, self.args.warm_mib)
        out = measured(tool.fetch_argv(name, target), tool.env())
        out["restored_files"], out["restored_bytes"] = tree_bytes(target)
        self.restored.append(target)
        os.sync()
        return out

    def validate(self, tool, target: Path, expected: str) -> str:
        """As bench/backups.py: start the restored cluster (recovery to the end of the backup
        with the tool's restore_command, then promote) and compare pgbench_accounts."""
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
            deadline = time.monotonic() + 300
            while conn.value("SELECT pg_is_in_recovery()") != "f":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{tool.label}: restored cluster did not promote")
                time.sleep(0.1)
            got = conn.value(ACCOUNTS_SQL)
            conn.close()
        finally:
            cluster.stop()
            kill_strays(target)
        if got != expected:
            raise RuntimeError(f"{tool.label}: restored chain has {got} in pgbench_accounts, "
                               f"the source had {expected}")
        shutil.rmtree(sock, ignore_errors=True)
        return f"pgbench_accounts count/sum(abalance) = {got} as in the source"

    def round(self, r: int) -> dict:
        k = (r - 1) % len(self.tools)
        order = self.tools[k:] + self.tools[:k]
        res: dict = {t.key: {} for t in self.tools}
        for tool in order:
            res[tool.key]["full"] = out = self.backup(tool, "full")
            log(f"round {r}: {tool.label} full {out['seconds']:.2f} s, read "
                f"{out['read_bytes'] / MB:.0f} MB, stored {out['stored_bytes'] / MB:.1f} MB")
        self.wait_archived()
        self.conn.query("CHECKPOINT")
        snapshot = block_hashes(self.data)
        res["touch"] = self.touch(snapshot)
        res["changes"] = ch = changed_reference(self.data, snapshot)
        expected = self.conn.value(ACCOUNTS_SQL)
        log(f"round {r}: {ch['changed_blocks']} of {ch['blocks']} blocks changed "
            f"({ch['fraction']:.2%}) in {ch['changed_files']} files; changed blocks "
            f"{ch['changed_bytes'] / MB:.1f} MB, zstd-3 {ch['zstd3'] / MB:.2f} MB; changed "
            f"files whole {ch['files_bytes'] / MB:.0f} MB, zstd-3 {ch['files_zstd3'] / MB:.1f} MB")
        for kind in ("incr", "diff"):
            for tool in order:
                res[tool.key][kind] = out = self.backup(tool, kind)
                log(f"round {r}: {tool.label} {kind} {out['seconds']:.2f} s, read "
                    f"{out['read_bytes'] / MB:.1f} MB (rchar {out['rchar'] / MB:.1f} MB), "
                    f"stored {out['stored_bytes'] / MB:.2f} MB")
                for line in out["stderr"].splitlines():
                    if "WAL summaries" in line or "WAL read for" in line or "WAL not read" in line:
                        out["wal_summaries"] = line.strip()
                        log(f"round {r}: {tool.label} {kind}: {line.strip()}")
        pgcluster.settle_removals(log)
        for tool in order:
            name = res[tool.key]["incr"]["name"]
            res[tool.key]["restore"] = out = self.restore(tool, name, r)
            log(f"round {r}: {tool.label} restore of full+incr {name}: {out['seconds']:.2f} s,"
                f" {out['restored_bytes'] / MB:.0f} MB in {out['restored_files']} files")
            if r == 1 and not self.args.no_check:
                out["check"] = self.validate(tool, self.restored[-1], expected)
                log(f"round {r}: {tool.label} restored chain checked: {out['check']}")
        return res

    def close(self) -> None:
        for target in self.restored:
            pgcluster.remove_tree(target)
        if self.conn is not None:
            self.conn.close()
        if self.cluster is not None:
            self.cluster.stop()


# -- the report ------------------------------------------------------------------------------
def med(values: list[float]) -> float:
    return statistics.median(values)


def render(rounds: list[dict], info: dict, labels: dict[str, str]) -> tuple[str, dict]:
    md: list[str] = []
    n = len(rounds)

    def table(title: str, header: list[str], rows: list[list[str]]) -> None:
        md.append(f"### {title}\n")
        md.append("| " + " | ".join(header) + " |")
        md.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        md.extend("| " + " | ".join(row) + " |" for row in rows)
        md.append("")

    def runs(key: str, kind: str, field: str) -> list[float]:
        return [rd[key][kind][field] for rd in rounds]

    def cell(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
        text = f"{med(values) / scale:.{digits}f}"
        return text + (f" ({', '.join(f'{v / scale:.{digits}f}' for v in values)})" if n > 1
                       else "")

    ch = [rd["changes"] for rd in rounds]
    table(f"Changes made by pgbench between the full and the incremental backups "
          f"(scale {info['source']['scale']}, {info['source']['bytes'] / MB:.0f} MB outside "
          "pg_wal)",
          ["round", "pgbench transactions", "blocks changed", "files changed",
           "changed blocks, MB", "zstd-3 of them, MB", "zstd-1, MB",
           "changed files whole, MB", "zstd-3 of those files, MB"],
          [[str(i + 1), str(rd["touch"]["transactions"]),
            f"{c['changed_blocks']} of {c['blocks']} ({c['fraction']:.1%})",
            str(c["changed_files"]), f"{c['changed_bytes'] / MB:.1f}", f"{c['zstd3'] / MB:.2f}",
            f"{c['zstd1'] / MB:.2f}", f"{c['files_bytes'] / MB:.0f}",
            f"{c['files_zstd3'] / MB:.1f}"] for i, (rd, c) in enumerate(zip(rounds, ch))])
    rows = []
    keys = list(labels)
    for key in keys:
        for kind in KINDS:
            rows.append([f"{labels[key]} {kind}", cell(runs(key, kind, "seconds")),
                         cell(runs(key, kind, "read_bytes"), MB, 1),
                         cell(runs(key, kind, "rchar"), MB, 1),
                         cell(runs(key, kind, "stored_bytes"), MB, 2),
                         f"{med(runs(key, kind, 'rss_kib')) / 1024:.0f}",
                         f"{med(runs(key, kind, 'cpu')):.1f}"])
    table(f"Backups: median of {n} round{'s' if n > 1 else ''} (each round listed)",
          ["backup", "wall s", "read from the data directory, MB (read_bytes)",
           "rchar, MB", "stored, MB", "peak RSS, MiB", "machine CPU s"], rows)
    table("Restore of the full+incr chain into an empty directory",
          ["tool", "wall s", "restored MB", "peak RSS, MiB", "machine CPU s"],
          [[labels[key], cell(runs(key, "restore", "seconds")),
            f"{med(runs(key, 'restore', 'restored_bytes')) / MB:.0f}",
            f"{med(runs(key, 'restore', 'rss_kib')) / 1024:.0f}",
            f"{med(runs(key, 'restore', 'cpu')):.1f}"] for key in keys])

    def m(key: str, kind: str, field: str) -> float:
        return med(runs(key, kind, field))

    goals = []
    ratio = m("walship", "incr", "seconds") / m("walship", "full", "seconds")
    goals.append(["walship incr time / walship full time", f"{ratio:.2f}", "<= 0.25",
                  "yes" if ratio <= 0.25 else "no"])
    ref = med([c["zstd3"] for c in ch])
    ratio = m("walship", "incr", "stored_bytes") / ref if ref else float("inf")
    goals.append(["walship incr stored / zstd-3 of the changed blocks", f"{ratio:.2f}",
                  "<= 1.5", "yes" if ratio <= 1.5 else "no"])
    if "pgbackrest" in labels:  # not with --no-pgbackrest
        ratio = m("pgbackrest", "incr", "seconds") / m("walship", "incr", "seconds")
        goals.append(["pgBackRest incr time / walship incr time", f"{ratio:.2f}", ">= 1.5",
                      "yes" if ratio >= 1.5 else "no"])
        ratio = m("walship", "incr", "stored_bytes") / m("pgbackrest", "incr", "stored_bytes")
        goals.append(["walship incr stored / pgBackRest incr stored", f"{ratio:.2f}", "<= 1",
                      "yes" if ratio <= 1 else "no"])
        ratio = m("pgbackrest", "restore", "seconds") / m("walship", "restore", "seconds")
        goals.append(["pgBackRest full+incr restore time / walship's", f"{ratio:.2f}", ">= 1.5",
                      "yes" if ratio >= 1.5 else "no"])
    if "pgbackrest-block" in labels:
        ratio = m("pgbackrest-block", "incr", "seconds") / m("walship", "incr", "seconds")
        goals.append(["(not a goal) pgBackRest block incr time / walship incr time",
                      f"{ratio:.2f}", "", ""])
        ratio = (m("walship", "incr", "stored_bytes")
                 / m("pgbackrest-block", "incr", "stored_bytes"))
        goals.append(["(not a goal) walship incr stored / pgBackRest block incr stored",
                      f"{ratio:.2f}", "", ""])
        ratio = m("pgbackrest-block", "restore", "seconds") / m("walship", "restore", "seconds")
        goals.append(["(not a goal) pgBackRest block full+incr restore time / walship's",
                      f"{ratio:.2f}", "", ""])
    table("Goals (issue 16, against pgBackRest as configured by default: file-level), ratios "
          "of the medians above" if "pgbackrest" in labels else
          "Goals (issue 16; walship only: --no-pgbackrest), ratios of the medians above",
          ["measure", "value", "goal", "met"], goals)
    checks = [f"* {labels[key]}: {rounds[0][key]['restore']['check']}"
              for key in keys if "check" in rounds[0][key]["restore"]]
    if checks:
        md.append("Restored chains checked (round 1): started, recovered to the end of the "
                  "incr with the tool's restore_command, promoted:\n")
        md.extend(checks)
        md.append("")
    return "\n".join(md), {"goals": goals}


def section(markdown: str, info: dict) -> str:
    v, mach = info["versions"], info["machine"]
    return f"""{SECTION_BEGIN}
## Incremental and differential backups against pgBackRest (issue 16)

Measured by [`bench/incremental.py`](../bench/incremental.py) on {info['date']} (UTC), in one
run against one Azurite over HTTPS on 127.0.0.1 (about {info['minutes']:.0f} minutes):
{mach['cpu']}, {mach['cores']} cores (shared with other work: a noisy machine),
{mach['memory_gib']} GiB, {mach['os']}, Linux {mach['kernel']}; PostgreSQL {v['postgresql']},
walship {v['walship']} (commit {v['walship_commit']}), pgBackRest {v['pgbackrest']} (zst level
3, process-max=2, archive-async; "pgBackRest": its default file-level incr/diff, no `--delta`;
"pgBackRest block (beta)": the same with `repo1-bundle=y`, `repo1-block=y`, `beta=y`: its block
incremental, "for beta testing only" in this version), Azurite {v['azurite']}.
Medians of {info['rounds']} round(s), each round listed; ratios are between medians of this
run. Each round: a full backup by each tool, pgbench until about {info['touch']:.0%} (at least
95% of that) of the
8 KiB blocks outside pg_wal changed (counted by hashing every block before and after), an incr
by each tool, then a diff (on the same full, so it holds the same changes), then the full+incr
chain of each restored into an empty directory (page cache emptied first). "Read from the data
directory" is the kernel's `read_bytes` of the tool's whole process tree with the data
directory evicted from the page cache before the backup (`rchar` counts cached re-reads, pipes
and sockets too); "stored" is what the backup added to its container (WAL excluded). The
reference for stored bytes is the zstd-3 size of exactly the changed blocks (what a
block-level incremental must store); the changed files whole are what a file-level one stores.
See the docstring of `bench/incremental.py` for the details.

```sh
{info['command']}
```

{markdown}
{SECTION_END}
"""


def write_section(path: Path, text: str) -> None:
    doc = path.read_text()
    start, end = doc.find(SECTION_BEGIN), doc.find(SECTION_END)
    if start >= 0 and end > start:
        doc = doc[:start] + text + doc[end + len(SECTION_END) + 1:]
    else:
        at = doc.find(NOTES_HEADING)
        at = at if at >= 0 else len(doc)
        doc = doc[:at] + text + "\n" + doc[at:]
    path.write_text(doc)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, default=70, help="pgbench -i scale (70: about 1.1 GB)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; tables show medians")
    p.add_argument("--touch", type=float, default=0.05,
                   help="fraction of the blocks pgbench changes before the incr (default 0.05)")
    p.add_argument("--walship", default=str(Path(sys.executable).parent / "walship"),
                   help="the walship executable (the postgres user must be able to run it)")
    p.add_argument("--cert", type=Path, default=DEFAULT_CERT_DIR / "cert.pem")
    p.add_argument("--key", type=Path, default=DEFAULT_CERT_DIR / "key.pem")
    p.add_argument("--azurite-bin", default=None)
    p.add_argument("--warm-mib", type=int, default=1536, metavar="MIB",
                   help="memory warmed before each timed command (see bench/pgcluster.py)")
    p.add_argument("--no-pgbackrest-block", action="store_true",
                   help="leave out pgBackRest with repo1-block=y (its beta block incremental)")
    p.add_argument("--no-pgbackrest", action="store_true",
                   help="walship only (e.g. on a PostgreSQL pgBackRest cannot back up)")
    p.add_argument("--pg-bindir", type=Path, default=None,
                   help="PostgreSQL's bindir for the cluster and pgbench (default: pg_config's; "
                   "the postgres user must be able to run it)")
    p.add_argument("--summarize-wal", action="store_true",
                   help="summarize_wal = on (PostgreSQL 17+: walship's incr/diff read the WAL "
                   "summaries instead of every file)")
    p.add_argument("--no-check", action="store_true",
                   help="do not start the restored clusters of round 1")
    p.add_argument("--json", type=Path, help="also write the raw results as JSON")
    p.add_argument("--markdown", type=Path, help="also write the section to this file")
    p.add_argument("--write-docs", action="store_true",
                   help="write the section into --docs (between its markers)")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: servers run as the postgres user")
    for path in (args.cert, args.key):
        if not path.exists():
            raise SystemExit(f"{path} missing: run bench/setup.sh")
    pgbackrest = shutil.which("pgbackrest")
    if not pgbackrest:
        raise SystemExit("pgbackrest missing: run bench/setup.sh")
    run_pg([args.walship, "--version"])  # the postgres user must be able to run it
    if args.write_docs and (args.no_pgbackrest or args.pg_bindir):
        raise SystemExit("--write-docs replaces the pgBackRest comparison section: not with "
                         "--no-pgbackrest or --pg-bindir (use --markdown)")
    if args.pg_bindir:  # read at call time by pgcluster (initdb, pg_ctl, psql, PATH)
        pgcluster.BIN = args.pg_bindir.resolve()
        run_pg([str(pgcluster.BIN / "postgres"), "--version"])

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    work = make_dir(Path(tempfile.mkdtemp(prefix="walship-incr-", dir="/tmp")))
    began = time.monotonic()
    azurite = Azurite(find_binary(args.azurite_bin), work / "azurite" / "data", args.cert,
                      args.key)
    log(f"work directory {work}")
    bench = None
    try:
        azurite.start()
        ctx = Context(azurite=azurite, cert=args.cert, walship=args.walship, barman_bin=Path("/"),
                      pgbackrest=pgbackrest)
        walship, pgbr = Walship(ctx), PgBackRest(ctx)
        info: dict = {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "machine": machine_info(), "rounds": args.rounds, "touch": args.touch,
            "versions": {"walship": walship.version().removeprefix("walship "),
                         "walship_commit": git_revision(),
                         "pgbackrest": pgbr.version(),
                         "postgresql": subprocess.run([str(pgcluster.BIN / "postgres"), "--version"],
                                                      capture_output=True, text=True)
                         .stdout.strip().replace("postgres (PostgreSQL) ", ""),
                         "azurite": azurite.version()},
        }
        log("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
        m = info["machine"]
        log(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, "
            f"Linux {m['kernel']}")
        bench = IncrBench(args, work, walship, pgbr)
        info["source"] = bench.build(args.scale)
        rounds = []
        for r in range(1, args.rounds + 1):
            rounds.append(bench.round(r))
        info["minutes"] = (time.monotonic() - began) / 60
        command = ("/opt/walship-bench-venv/bin/python bench/incremental.py"
                   + (f" --scale {args.scale}" if args.scale != 70 else "")
                   + f" --rounds {args.rounds}"
                   + (f" --touch {args.touch}" if args.touch != 0.05 else "")
                   + (" --no-pgbackrest-block" if args.no_pgbackrest_block else "")
                   + (" --no-pgbackrest" if args.no_pgbackrest else "")
                   + (f" --pg-bindir {args.pg_bindir}" if args.pg_bindir else "")
                   + (" --summarize-wal" if args.summarize_wal else "")
                   + f" --walship {args.walship}")
        info["command"] = command
        labels = {t.key: t.label for t in bench.tools}
        markdown, extra = render(rounds, info, labels)
        text = section(markdown, info)
        print()
        print(text)
        if args.json:
            args.json.write_text(json.dumps({"info": info, "rounds": rounds}, indent=2,
                                            default=str))
        if args.markdown:
            args.markdown.write_text(text)
        if args.write_docs:
            write_section(args.docs, text)
            log(f"wrote the section into {args.docs}")
        log(f"done in {info['minutes']:.1f} minutes")
        return 0
    finally:
        if bench is not None:
            bench.close()
        pgcluster.stop_all()
        kill_strays(work)
        azurite.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
