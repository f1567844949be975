"""Wall time of one ``walship wal-push`` and one ``walship wal-fetch`` call for a 16 MiB segment of
real pgbench WAL, on ``file://`` and on Azurite (HTTPS), and the compression ratio.

    bash bench/setup.sh && /opt/walship-venv/bin/python bench/single_call.py [--calls 9]

Each call is a fresh process, timed from fork to exit, the way PostgreSQL runs archive_command
and restore_command, with push-ahead and prefetch turned off (WALSHIP_PUSH_AHEAD=0,
WALSHIP_PREFETCH=0): this is the cold cost of one call, which the speed paths then hide. Every
fetched file is compared byte for byte with the original. Prints a Markdown table of medians.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from azurite import Azurite, find_binary  # noqa: E402
from pgbench_wal import make_corpus  # noqa: E402

DEFAULT_DIR = Path(os.environ.get("WALSHIP_BENCH_DIR", "/opt/walship-bench"))


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd="/")
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}: {proc.stderr}")
    return seconds, proc.stderr


def out_bytes(line: str) -> int:
    return int(line.split(" out=")[1].split()[0])


def measure(walship: str, env: dict[str, str], corpus: list[Path], work: Path) -> dict:
    pg_wal = work / "pg_wal"
    restore = work / "restore"
    pg_wal.mkdir()
    restore.mkdir()
    push, fetch, stored, plain = [], [], 0, 0
    for segment in corpus:
        source = pg_wal / segment.name
        shutil.copyfile(segment, source)
        seconds, err = timed([walship, "wal-push", str(source)], env)
        push.append(seconds)
        stored += out_bytes(err)
        plain += segment.stat().st_size
        target = restore / "RECOVERYXLOG"
        seconds, _ = timed([walship, "wal-fetch", segment.name, str(target)], env)
        fetch.append(seconds)
        if not filecmp.cmp(segment, target, shallow=False):
            raise RuntimeError(f"{segment.name}: fetched bytes differ")
        target.unlink()
    return {"push": push, "fetch": fetch, "stored": stored, "plain": plain}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=9, help="segments pushed and fetched")
    parser.add_argument("--walship", default=str(Path(sys.executable).parent / "walship"))
    parser.add_argument("--cert", type=Path, default=DEFAULT_DIR / "cert.pem")
    parser.add_argument("--key", type=Path, default=DEFAULT_DIR / "key.pem")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="walship-single-"))
    azurite = Azurite(find_binary(None), work / "azurite", args.cert, args.key)
    try:
        corpus = make_corpus(work / "corpus", args.calls, 1)  # mostly pgbench transactions
        base = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LC_ALL": "C",
                "WALSHIP_CONFIG": os.devnull, "WALSHIP_PUSH_AHEAD": "0",
                "WALSHIP_PREFETCH": "0"}
        results = {}
        (work / "file" / "repo").mkdir(parents=True)
        results["file://"] = measure(args.walship, {**base, "WALSHIP_REPO":
                                                    f"file://{work / 'file' / 'repo'}"},
                                     corpus, work / "file")
        azurite.start()
        azurite.create_container("single")
        (work / "azure").mkdir()
        results["Azurite (HTTPS)"] = measure(args.walship, {
            **base, "WALSHIP_REPO": "azure://single/wal",
            "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string,
            "REQUESTS_CA_BUNDLE": str(args.cert), "SSL_CERT_FILE": str(args.cert)},
            corpus, work / "azure")
    finally:
        azurite.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(corpus)} pgbench WAL segments of 16 MiB, one process per call, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| repository | wal-push median s | wal-fetch median s | push samples | "
          "fetch samples | stored / plain |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {statistics.median(r['push']):.3f} | "
              f"{statistics.median(r['fetch']):.3f} | "
              f"{' '.join(f'{s:.3f}' for s in r['push'])} | "
              f"{' '.join(f'{s:.3f}' for s in r['fetch'])} | "
              f"{r['stored'] / 2**20:.1f} MiB / {r['plain'] / 2**20:.0f} MiB = "
              f"1:{r['plain'] / r['stored']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
