"""End to end: a real PostgreSQL archives into storage that accepts connections and never
answers (a black hole). Each archive_command fails within walship's call_timeout, and a fast
shutdown completes within seconds even with a long call_timeout (before: about 330 s per
archive_command, and `pg_ctl stop -m fast` could not stop the server for 23 minutes)."""

from __future__ import annotations

import os
import time

import pytest

from tests.fixtures.postgres import chown_to
from tests.test_deadline import BlackHole
from walship.deadline import STOPPING_SECONDS

pytestmark = [pytest.mark.e2e]

CALL_TIMEOUT = 2  # seconds: small, to keep the test short


@pytest.mark.timeout(240)
def test_archiving_into_a_black_hole_fails_in_time_and_fast_shutdown_is_quick(pg):
    hole = BlackHole()
    try:
        config = pg.path / "walship.toml"  # read by every call: changed between the phases
        config.write_text(f"call_timeout = {CALL_TIMEOUT}\n")
        os.chmod(config, 0o644)
        chown_to(config, pg.user)
        env = {k: v for k, v in hole.env().items()
               if k.startswith(("WALSHIP_REPO", "AZURE_"))}
        env["WALSHIP_CONFIG"] = str(config)
        primary = pg.initdb("primary", env=env)
        primary.start()

        def failures() -> int:
            return int(primary.psql("SELECT failed_count FROM pg_stat_archiver"))

        started = time.monotonic()
        primary.switch_wal()
        # PostgreSQL tries a file three times, a second apart: three failures, each within
        # the deadline (and the time to start walship), or about 165 s each before.
        pg.wait_for(lambda: failures() >= 3, 3 * (CALL_TIMEOUT + 1) + 8,
                    "three failed archive_command calls", primary)
        took = time.monotonic() - started
        assert took < 3 * (CALL_TIMEOUT + 1) + 8, took
        log = primary.log_text()
        assert "call_timeout" in log, primary.log_tail()

        # A fast shutdown waits for the archiver's last round (three tries of the file): each
        # wal-push made while the server stops gets STOPPING_SECONDS, not call_timeout.
        config.write_text("call_timeout = 600\n")
        stopping = time.monotonic()
        result = primary.pg_ctl("-m", "fast", "-w", "-t", "60", "stop", check=False,
                                timeout=90)
        stopped = time.monotonic() - stopping
        assert result.returncode == 0, primary.log_tail()
        assert stopped < 3 * (STOPPING_SECONDS + 1) + 5, (stopped, primary.log_tail())
        assert primary.postmaster_pid() is None
    finally:
        hole.close()
