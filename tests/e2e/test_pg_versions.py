"""The PostgreSQL installations the end-to-end tests run on (``pg_install``, tests marked
``pg_versions``): each such test runs on Debian's PostgreSQL and on 18, and a PostgreSQL 18 that
``.ci/run`` promised (``WALSHIP_TEST_PG18_BINDIR``) but that is missing fails those tests
instead of skipping them, so CI cannot go green without running them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
INNER = """
import pytest

@pytest.mark.pg_versions
def test_inner(pg_install):
    print(f"RAN {pg_install.id} {pg_install.major} {pg_install.bindir}")
"""


def run_inner(tmp_path: Path, pg18_bindir: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {k: v for k, v in os.environ.items() if k != "WALSHIP_TEST_PG18_BINDIR"}
    if pg18_bindir is not None:
        env["WALSHIP_TEST_PG18_BINDIR"] = pg18_bindir
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-s",
                           "-p", "no:cacheprovider", "-p", "tests.fixtures.postgres",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning",
                           "-c", os.devnull, "--rootdir", str(tmp_path),
                           str(tmp_path / "test_inner.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_a_promised_pg18_that_is_missing_fails(tmp_path):
    proc = run_inner(tmp_path, str(tmp_path / "no-such-bindir"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 passed" in out and "1 error" in out and "skipped" not in out, out
    assert "ERROR" in out and "test_inner[pg18]" in out and "lacks initdb" in out, out
    assert "RAN pg" in out  # Debian's ran


def test_pg18_runs_where_installed_else_skips(tmp_path):
    from tests.fixtures.postgres import embedded_pg_bindir

    proc = run_inner(tmp_path, None)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    bindir = embedded_pg_bindir()
    if bindir is not None and os.environ.get("WALSHIP_TEST_PG18_BINDIR"):
        assert f"RAN pg18 18 {bindir}" in out, out
    else:  # an unpromised 18 may be absent (or unreadable by the server's user): a skip
        assert "RAN pg18 18" in out or "1 skipped" in out, out
