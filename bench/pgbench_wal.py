"""Make a corpus of real WAL: run pgbench on a throwaway cluster and keep the segments it
archives (archive_command = cp). Used by the benchmarks to feed every tool the same WAL.

    python bench/pgbench_wal.py OUTDIR --segments 60 [--scale 20]

Runs the server as the ``postgres`` user when started as root. Needs PostgreSQL's server binaries.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def bindir() -> Path:
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def make_corpus(outdir: Path, segments: int, scale: int) -> list[Path]:
    bins = bindir()
    user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    base = Path(tempfile.mkdtemp(prefix="walship-corpus-", dir="/tmp"))
    os.chmod(base, 0o755)
    archive = base / "archive"
    archive.mkdir()
    if user:
        os.chown(base, user.pw_uid, user.pw_gid)
        os.chown(archive, user.pw_uid, user.pw_gid)
    data = base / "data"
    env = {"PATH": os.environ["PATH"], "HOME": str(base), "LC_ALL": "C"}

    def run(*args: str) -> str:
        return subprocess.run(list(args), env=env, capture_output=True, text=True, check=True,
                              cwd="/", **kwargs).stdout

    run(str(bins / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
    with open(data / "postgresql.auto.conf", "a") as conf:
        conf.write(f"listen_addresses = ''\nunix_socket_directories = '{base}'\n"
                   "archive_mode = on\nwal_level = replica\nmax_wal_size = 1GB\n"
                   f"archive_command = 'cp %p {archive}/%f'\nfsync = off\n")
    run(str(bins / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "start")
    try:
        run(str(bins / "pgbench"), "-h", str(base), "-U", "postgres", "-i", "-s", str(scale),
            "postgres")
        deadline = time.monotonic() + 600
        while len(list(archive.glob("????????????????????????"))) < segments:
            if time.monotonic() > deadline:
                raise RuntimeError("pgbench did not produce enough WAL in 10 minutes")
            run(str(bins / "pgbench"), "-h", str(base), "-U", "postgres", "-n", "-c", "2",
                "-T", "5", "postgres")
    finally:
        run(str(bins / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    outdir.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in archive.glob("????????????????????????"))[:segments]
    kept = []
    for name in names:
        shutil.copyfile(archive / name, outdir / name)
        kept.append(outdir / name)
    shutil.rmtree(base, ignore_errors=True)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--segments", type=int, default=60)
    parser.add_argument("--scale", type=int, default=20)
    args = parser.parse_args()
    files = make_corpus(args.outdir, args.segments, args.scale)
    print(f"{len(files)} segments in {args.outdir}")


if __name__ == "__main__":
    main()
