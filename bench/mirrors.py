"""Mirrors benchmark: walship's archive drain with one sync mirror (a second Azurite) against
the same drain with none, and `walship repo-sync` throughput between two Azurites against
`walship backup-fetch`'s rate from one, in one run on one machine.

    /opt/walship-venv/bin/python bench/mirrors.py --segments 32 --repeat 3

(1) Drain: the backlog template of bench/run.py (PostgreSQL 15, >= SEGMENTS .ready segments)
    switches archive_command (`walship wal-push %p`) on; time until pg_stat_archiver's
    last_archived_wal is the last one. "none": primary on Azurite A only; "sync": the same plus
    one sync mirror on Azurite B (a second process, its own port and location). The order
    alternates per repeat. After the first no-mirror drain, `walship backup-push` of the same
    (running) cluster adds one base backup to that repository.
(2) repo-sync: `walship repo-sync --to b` copies that repository (the drained WAL plus the
    base backup) from A to an empty container on B; MiB/s of stored bytes copied. Against
    `walship backup-fetch LATEST` of that backup from A: MiB/s of the backup's stored bytes.
Both Azurites use HTTPS with the certificate of bench/setup.sh (/opt/walship-bench).
Everything runs under /tmp/walship-mirrors-* and is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
from pgcluster import Cluster, copy_tree, make_dir  # noqa: E402
from run import (DEFAULT_CERT_DIR, build_template, cpu_seconds, kill_strays, log,  # noqa: E402
                 machine_info, process_cpu)

MIB = 2**20
POLL = 0.05


class Setup:
    def __init__(self, args, work: Path, a: Azurite, b: Azurite, cert: Path) -> None:
        self.args, self.work, self.a, self.b, self.cert = args, work, a, b, cert
        self.exe = args.walship

    def config(self, path: Path, mirror_container: str | None, mode: str) -> Path:
        text = ""
        if mirror_container:
            text = ("[[mirrors]]\nname = \"b\"\n"
                    f"repo = \"azure://{mirror_container}/cluster\"\nmode = \"{mode}\"\n"
                    "[mirrors.azure]\n"
                    f"connection_string = \"{self.b.connection_string}\"\n")
        path.write_text(text)
        pgcluster.chown_tree(path)
        os.chmod(path, 0o600)
        return path

    def env(self, container: str, home: Path, config: Path) -> dict[str, str]:
        env = pgcluster.base_env(str(home))
        env.update(WALSHIP_REPO=f"azure://{container}/cluster", WALSHIP_CONFIG=str(config),
                   AZURE_STORAGE_CONNECTION_STRING=self.a.connection_string,
                   REQUESTS_CA_BUNDLE=str(self.cert), SSL_CERT_FILE=str(self.cert))
        return env


def drain(s: Setup, template, mode: str, repeat: int, backup: bool) -> dict:
    container = f"drain-{mode}-{repeat}"
    run_dir = make_dir(s.work / container)
    data = run_dir / "data"
    copy_tree(template.data, data)
    sockdir = make_dir(run_dir / "sock")
    cluster = Cluster(data, sockdir, run_dir / "postgres.log")
    cluster.configure(unix_socket_directories=str(sockdir), archive_command="",
                      log_min_messages="log")
    s.a.create_container(container)
    mirror = None
    if mode == "sync":
        mirror = container
        s.b.create_container(mirror)
    home = make_dir(run_dir / "home")
    config = s.config(run_dir / "walship.toml", mirror, "sync")
    env = s.env(container, home, config)
    cluster.start(env=env)
    result: dict = {}
    try:
        command = f"{shlex.quote(s.exe)} wal-push %p"
        last = template.backlog[-1]
        with cluster.connect() as conn:
            conn.query("ALTER SYSTEM SET archive_command = '" + command + "'")
            azurites = [s.a.proc.pid, s.b.proc.pid]
            az_cpu, cpu = process_cpu(azurites), cpu_seconds()
            started = time.perf_counter()
            conn.query("SELECT pg_reload_conf()")
            deadline = started + s.args.timeout
            while True:
                done, failed = conn.query(
                    "SELECT last_archived_wal, failed_count FROM pg_stat_archiver")[0]
                if done is not None and len(done) == 24 and done >= last:
                    break
                if time.perf_counter() > deadline or int(failed) >= 3:
                    raise RuntimeError(f"{mode}: archiving stuck at {done}, {failed} failures:\n"
                                       f"{cluster.log_tail()}")
                time.sleep(POLL)
            result["seconds"] = time.perf_counter() - started
            result["cpu"] = cpu_seconds() - cpu  # the whole machine's
            result["azurite_cpu"] = process_cpu(azurites) - az_cpu
            result["failed"] = int(conn.value("SELECT failed_count FROM pg_stat_archiver"))
        if backup:
            benv = dict(env, PGHOST=str(sockdir), PGPORT="5432", PGUSER="postgres",
                        PGDATABASE="postgres")
            started = time.perf_counter()
            subprocess.run([s.exe, "backup-push"], env=benv, cwd="/", check=True,
                           capture_output=True, timeout=900, **pgcluster.as_postgres())
            result["backup_push_seconds"] = time.perf_counter() - started
    finally:
        cluster.stop()
        kill_strays(run_dir)
    pgcluster.remove_tree(data)
    result["blobs"], result["bytes"] = s.a.container_usage(container)
    if mirror:
        result["mirror_blobs"], result["mirror_bytes"] = s.b.container_usage(mirror)
        if result["mirror_blobs"] < len(template.backlog):
            raise RuntimeError(f"mirror holds {result['mirror_blobs']} blobs")
    result["container"] = container
    return result


def repo_sync(s: Setup, source: str, repeat: int) -> dict:
    run_dir = make_dir(s.work / f"sync-{repeat}")
    target = f"sync-{repeat}"
    s.b.create_container(target)
    config = s.config(run_dir / "walship.toml", target, "async")
    env = s.env(source, make_dir(run_dir / "home"), config)
    started = time.perf_counter()
    proc = subprocess.run([s.exe, "repo-sync", "--to", "b", "--json"], env=env, cwd="/",
                          capture_output=True, text=True, timeout=1800, check=False,
                          **pgcluster.as_postgres())
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"repo-sync exited {proc.returncode}: {proc.stderr[-3000:]}")
    blobs, stored = s.b.container_usage(target)
    src_blobs, _ = s.a.container_usage(source)
    if blobs != src_blobs:
        raise RuntimeError(f"repo-sync copied {blobs} of {src_blobs} objects")
    return {"seconds": seconds, "blobs": blobs, "bytes": stored,
            "mib_s": stored / MIB / seconds}


def backup_fetch(s: Setup, source: str, repeat: int) -> dict:
    run_dir = make_dir(s.work / f"fetch-{repeat}")
    config = s.config(run_dir / "walship.toml", None, "")
    env = s.env(source, make_dir(run_dir / "home"), config)
    target = run_dir / "restored"
    started = time.perf_counter()
    proc = subprocess.run([s.exe, "backup-fetch", "LATEST", str(target)], env=env, cwd="/",
                          capture_output=True, text=True, timeout=1800, check=False,
                          **pgcluster.as_postgres())
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"backup-fetch exited {proc.returncode}: {proc.stderr[-3000:]}")
    client = s.a._service().get_container_client(source)
    stored = sum(b.size for b in client.list_blobs() if not b.name.startswith("cluster/wal/"))
    pgcluster.remove_tree(run_dir)
    return {"seconds": seconds, "bytes": stored, "mib_s": stored / MIB / seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--segments", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--walship", default="/opt/walship-venv/bin/walship")
    p.add_argument("--cert-dir", type=Path, default=DEFAULT_CERT_DIR)
    p.add_argument("--json", type=Path, help="write the results here too")
    args = p.parse_args()
    cert, key = args.cert_dir / "cert.pem", args.cert_dir / "key.pem"
    work = Path(tempfile.mkdtemp(prefix="walship-mirrors-", dir="/tmp"))
    os.chmod(work, 0o755)
    binary = find_binary()
    a = Azurite(binary, make_dir(work / "azurite-a") / "data", cert, key)
    b = Azurite(binary, make_dir(work / "azurite-b") / "data", cert, key)
    results: dict = {"drain": {"none": [], "sync": []}, "sync": [], "fetch": [],
                     "machine": machine_info(), "segments": args.segments}
    try:
        a.start()
        b.start()
        log(f"Azurite A on {a.port}, B on {b.port}")
        s = Setup(args, work, a, b, cert)
        template = build_template(work, args.segments, 4, args.scale)
        results["backlog"] = len(template.backlog)
        source = None
        for i in range(args.repeat):
            order = ["none", "sync"] if i % 2 == 0 else ["sync", "none"]
            for mode in order:
                r = drain(s, template, mode, i, backup=(source is None and mode == "none"))
                if "backup_push_seconds" in r:
                    source = r["container"]
                results["drain"][mode].append(r)
                log(f"drain {mode} #{i}: {r['seconds']:.2f} s")
        for i in range(args.repeat):
            for what, fn in ([("sync", repo_sync), ("fetch", backup_fetch)] if i % 2 == 0
                             else [("fetch", backup_fetch), ("sync", repo_sync)]):
                r = fn(s, source, i)
                results[what].append(r)
                log(f"{what} #{i}: {r['seconds']:.2f} s, {r['bytes'] / MIB:.1f} MiB, "
                    f"{r['mib_s']:.1f} MiB/s")
        none = statistics.median(r["seconds"] for r in results["drain"]["none"])
        sync = statistics.median(r["seconds"] for r in results["drain"]["sync"])
        sync_rate = statistics.median(r["mib_s"] for r in results["sync"])
        fetch_rate = statistics.median(r["mib_s"] for r in results["fetch"])
        results["summary"] = {"drain_none_s": none, "drain_sync_s": sync,
                              "drain_ratio": sync / none, "repo_sync_mib_s": sync_rate,
                              "backup_fetch_mib_s": fetch_rate,
                              "sync_vs_fetch": sync_rate / fetch_rate}
        text = json.dumps(results, indent=1)
        print(text)
        if args.json:
            args.json.write_text(text)
    finally:
        for az in (a, b):
            az.stop()
        pgcluster.stop_all()
        pgcluster.remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
