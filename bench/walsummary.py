"""How long walship.backup.walsummary.changed_blocks takes on PostgreSQL 18, and how many
blocks it reports, against reading and hashing every relation file (what a backup does without
summaries).

A pgbench database of ``--scale`` (70: 7 million accounts, about 115,000 pages of
pgbench_accounts) with ``summarize_wal = on``; a checkpoint (the parent's start); pgbench
transactions enough to touch about ``--fraction`` of the account pages (random accounts:
T = -P ln(1 - f)); then a backup's start on walship's PostgresSource and changed_blocks over
the range, ``--runs`` times. Run as root (the server runs as ``postgres``) or as the server's
user::

    /opt/wsv-walsum/bin/python bench/walsummary.py --bindir <PostgreSQL 18 bin> [--scale 70]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from walship import wal  # noqa: E402
from walship.backup.source import PostgresSource  # noqa: E402
from walship.backup.walsummary import changed_blocks, parse_relation_path  # noqa: E402


def as_server() -> dict:
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam("postgres")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def run(args: list[str], **kwargs) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, cwd="/", **as_server(),
                          **kwargs)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bindir", required=True)
    parser.add_argument("--scale", type=int, default=70)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    bindir = Path(args.bindir)
    work = Path(tempfile.mkdtemp(prefix="walsummary-bench-", dir="/tmp"))
    os.chmod(work, 0o755)
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(work, user.pw_uid, user.pw_gid)
    data = work / "data"
    conn = ["-h", str(work), "-U", "postgres", "postgres"]
    try:
        run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--data-checksums", "-N", "-E", "UTF8", "--locale=C"])
        with open(data / "postgresql.auto.conf", "a") as conf:
            conf.write(f"listen_addresses = ''\nunix_socket_directories = '{work}'\n"
                       "summarize_wal = on\nshared_buffers = '256MB'\nfsync = off\n"
                       "max_wal_size = '8GB'\nautovacuum = off\n")
        run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(work / "log"), "-w", "start"])
        psql = [str(bindir / "psql"), "-XAtq", *conn, "-c"]
        started = time.monotonic()
        run([str(bindir / "pgbench"), "-i", "-q", "-s", str(args.scale), *conn])
        print(f"pgbench -i -s {args.scale}: {time.monotonic() - started:.0f} s")
        pages = int(run([*psql, "SELECT pg_relation_size('pgbench_accounts') / 8192"]))
        transactions = math.ceil(-pages * math.log(1 - args.fraction))
        run([*psql, "CHECKPOINT"])
        since = wal.Lsn.parse(run([*psql, "SELECT redo_lsn FROM pg_control_checkpoint()"]))
        started = time.monotonic()
        run([str(bindir / "pgbench"), "-n", "-c", "2", "-j", "2", "-t",
             str(math.ceil(transactions / 2)), *conn])
        print(f"pgbench -t {math.ceil(transactions / 2)} x 2 clients: "
              f"{time.monotonic() - started:.0f} s")
        # pgbench -i writes 61 accounts per 8 kB page, in aid order: the pages whose rows
        # pgbench updated (the old versions; the new ones go where there is room)
        per_page = math.ceil(args.scale * 100000 / pages)
        touched = int(run([*psql, f"SELECT count(DISTINCT (aid - 1) / {per_page}) "
                                  "FROM pgbench_history"]))
        source = PostgresSource(f"host={work} user=postgres dbname=postgres")
        try:
            until = source.start("bench", fast=True)
            times = []
            peak = 0
            for number in range(args.runs):
                tracemalloc.start()
                began = time.perf_counter()
                found = changed_blocks(source._conn, timeline=1, since_lsn=since,
                                       until_lsn=until, log=print)
                times.append(time.perf_counter() - began)
                peak = max(peak, tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
                assert found is not None
            accounts = run([*psql, "SELECT pg_relation_filepath('pgbench_accounts')"]).strip()
            reported = found.file_changes(accounts, (data / accounts).stat().st_size)
            # the alternative: read every relation file and hash each block
            began = time.perf_counter()
            total = 0
            for root, _dirs, files in os.walk(data / "base"):
                for name in files:
                    path = Path(root) / name
                    if parse_relation_path(str(path.relative_to(data)),
                                           found.version_directory) is None:
                        continue
                    with open(path, "rb") as handle:
                        while block := handle.read(8192):
                            hashlib.sha256(block).digest()
                            total += len(block)
            hashing = time.perf_counter() - began
            source.stop(wait_for_archive=False)
        finally:
            source.close()
        print(f"range {since}..{until}: {found.summaries} summaries, {found.fork_count} forks, "
              f"{found.block_count} changed blocks in all")
        print(f"pgbench_accounts: {pages} pages, {touched} had a row updated "
              f"({100 * touched / pages:.1f} %); summaries name "
              f"{len(reported.blocks) if reported else 'n/a'} blocks of its first segment file")
        print(f"changed_blocks: {', '.join(f'{t:.3f}' for t in times)} s "
              f"(median {statistics.median(times):.3f} s), Python peak "
              f"{peak / 1e6:.1f} MB")
        print(f"reading and hashing every relation file (page cache warm): {total / 2**20:.0f} "
              f"MiB in {hashing:.1f} s")
    finally:
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, cwd="/", **as_server())
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
