"""``walship demo``, the README's first command for a new user: it must run end to end with the
installed executable (as root it runs the servers as an unprivileged user), including on a
cluster made under the C locale (a SQL_ASCII database, where the driver returns bytes)."""

from __future__ import annotations

import os
import subprocess

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.pg_versions
def test_demo_backs_up_and_restores_to_a_point_in_time(walship_bin: str, pg_install) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALSHIP_", "PG"))}
    env["LC_ALL"] = "C"
    env["PATH"] = f"{pg_install.bindir}:{env.get('PATH', '/usr/bin:/bin')}"  # its initdb first
    proc = subprocess.run([walship_bin, "demo"], env=env, capture_output=True, text=True,
                          timeout=300, cwd="/", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"PostgreSQL from {pg_install.bindir};" in out, out
    assert "walship backup-push took an online base backup" in out
    assert "restored data matches the original before the accident" in out
    assert "WAL files archived by walship wal-push" in out
