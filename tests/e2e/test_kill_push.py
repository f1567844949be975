"""kill -9 of wal-push at random moments never leaves a visible partial object: a later fetch
gives the right bytes or "not found" (1), never garbage, and pushing again then succeeds.

A trial counts as a kill only if the wal-push (this test's own child, its command line checked)
was alive when SIGKILL was sent and then died of it; no other process is signalled."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.postgres import check_build_id

TRIALS = 24
WALSHIP = [sys.executable, "-m", "walship"]


@pytest.fixture(params=["file", "azure"])
def repo_env(request, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALSHIP_", "AZURE_"))}
    if request.param == "file":
        root = tmp_path / "repo"
        root.mkdir()
        env["WALSHIP_REPO"] = f"file://{root}"
    else:
        env.update(request.getfixturevalue("azure_repository").env)
    env["WALSHIP_CONFIG"] = os.devnull
    # ``python -m walship`` runs the package first on sys.path (the working directory, then
    # site-packages): it must be the checkout's.
    version = run(["--version"], env, text=True)
    check_build_id(" ".join(WALSHIP), version.stdout)
    return env


def run(args, env, **kwargs):
    return subprocess.run(WALSHIP + args, env=env, capture_output=True, **kwargs)


@pytest.mark.timeout(300)
def test_kill_9_never_leaves_a_partial_object(repo_env, tmp_path):
    rng = random.Random(20261125)
    wal_dir = tmp_path / "pg_wal"
    wal_dir.mkdir()
    # One complete segment first, so that "not found" is authoritative afterwards.
    durations = []
    for number in (1, 2, 3):  # warm pushes: how long one call takes here
        warm = wal_dir / f"00000001000000FF{number:08X}"
        warm.write_bytes(os.urandom(8 << 20) + bytes(8 << 20))
        started = time.monotonic()
        assert run(["wal-push", str(warm)], repo_env).returncode == 0
        durations.append(time.monotonic() - started)
    duration = min(durations)

    outcomes = {"killed": 0, "finished": 0, "found": 0, "not found": 0}
    for trial in range(TRIALS):
        name = f"0000000100000000{trial + 1:08X}"
        path = wal_dir / name
        data = os.urandom(8 << 20) + bytes(8 << 20)  # half incompressible: real work to kill
        path.write_bytes(data)
        proc = subprocess.Popen(WALSHIP + ["wal-push", str(path)], env=repo_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, duration))
        signalled = False
        if proc.poll() is None:  # not reaped: the pid is still this walship's
            argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[:-1]
            if argv:  # (empty: a zombie, it has just ended)
                assert [a.decode() for a in argv] == WALSHIP + ["wal-push", str(path)], argv
                proc.send_signal(signal.SIGKILL)
                signalled = True
        status = proc.wait()
        if status == -signal.SIGKILL:
            assert signalled  # nobody else kills it
            outcomes["killed"] += 1
        else:  # it ended just before the signal: a finished push
            assert status == 0, (trial, status)
            outcomes["finished"] += 1

        out = tmp_path / "fetched"
        fetched = run(["wal-fetch", name, str(out)], repo_env)
        if fetched.returncode == 0:
            assert out.read_bytes() == data, f"trial {trial}: wrong bytes delivered"
            outcomes["found"] += 1
            out.unlink()
        else:
            assert fetched.returncode == 1, (trial, fetched.stderr)
            assert not out.exists()
            outcomes["not found"] += 1
        # PostgreSQL retries the push: it must now succeed and deliver the right bytes.
        assert run(["wal-push", str(path)], repo_env).returncode == 0
        assert run(["wal-fetch", name, str(out)], repo_env).returncode == 0
        assert out.read_bytes() == data
        out.unlink()
    print(outcomes)
    assert outcomes["killed"] >= TRIALS // 2, outcomes
