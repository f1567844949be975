"""What one wal-fetch or wal-push call costs when its work was done ahead: a segment sealed in
the prefetch cache, a file recorded as pushed ahead. Compares the native launcher (``walship``),
the Python program (``walship-py``), a bare ``python3 -c pass`` of the same interpreter, and
``cp`` of the same 16 MiB.

    /opt/walship-bench-venv/bin/python bench/fast_call.py [--calls 30]

Each call is a fresh ``/bin/sh -c`` process, as PostgreSQL runs its commands; wall time is
measured from fork to exit, CPU time is the children's user + system. The cache and the push
records are prepared before each call and not timed; this process holds the worker's and the
pusher's locks, so no helper is started. Prints a Markdown table of medians.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from walship import spool

SEGMENT = "000000010000000000000010"
SIZE = 16 << 20


def timed(command: str, cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # (os.times counts clock ticks)
    started = time.perf_counter()
    subprocess.run(["/bin/sh", "-c", command], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="walship-fast-call-"))
    try:
        wal = work / "pg_wal"
        cache = Path(spool.cache_dir(str(wal)))
        cache.mkdir(parents=True)
        (work / "source").write_bytes(os.urandom(SIZE))
        env = {"PATH": "/usr/bin:/bin", "WALSHIP_REPO": f"file://{work}/repo",
               "WALSHIP_CONFIG": os.devnull}
        settings = spool.settings_fingerprint(env)
        locks = []
        for lock in (cache / "worker.lock", wal / "walship" / "pusher.lock"):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            locks.append(fd)

        def sealed() -> None:
            shutil.copyfile(work / "source", cache / SEGMENT)
            spool.seal_cached(str(cache), SEGMENT, settings)
            (wal / "RECOVERYXLOG").unlink(missing_ok=True)  # as PostgreSQL does before a call

        def recorded() -> None:
            shutil.copyfile(work / "source", wal / SEGMENT)
            spool.record_pushed(str(wal), SEGMENT, spool.file_fingerprint(str(wal / SEGMENT)),
                                settings)

        def nothing() -> None:
            (work / "copy").unlink(missing_ok=True)

        fetch = f"wal-fetch {SEGMENT} pg_wal/RECOVERYXLOG"
        push = f"wal-push pg_wal/{SEGMENT}"
        cases = [
            ("wal-fetch, segment in the cache", "native launcher", f"{bin_dir}/walship {fetch}",
             sealed),
            ("wal-fetch, segment in the cache", "Python program", f"{bin_dir}/walship-py {fetch}",
             sealed),
            ("wal-push, pushed ahead", "native launcher", f"{bin_dir}/walship {push}", recorded),
            ("wal-push, pushed ahead", "Python program", f"{bin_dir}/walship-py {push}", recorded),
            ("reference", "python3 -c pass", f"{sys.executable} -c pass", nothing),
            ("reference", "cp of the 16 MiB segment", "cp source copy", nothing),
        ]
        results: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(cases))}
        for _ in range(args.calls):  # interleaved, so that noise hits every case alike
            for i, (_, _, command, prepare) in enumerate(cases):
                prepare()
                results[i].append(timed(command, work, env))
        if (wal / "RECOVERYXLOG").read_bytes() != (work / "source").read_bytes():
            raise SystemExit("the delivered segment differs from the original")
        print("| call | program | median wall ms | median CPU ms | calls |")
        print("|---|---|---:|---:|---:|")
        for i, (call, program, _, _) in enumerate(cases):
            walls = [w for w, _ in results[i]]
            cpus = [c for _, c in results[i]]
            print(f"| {call} | {program} | {statistics.median(walls) * 1000:.1f} | "
                  f"{statistics.median(cpus) * 1000:.1f} | {len(walls)} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
