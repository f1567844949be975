"""walship.spool: the environment its detached helpers start with."""

from __future__ import annotations

import os
import time

from walship import spool


def test_helpers_keep_their_heap():
    env = spool.helper_environment({"PATH": "/bin", "WALSHIP_REPO": "file:///r"})
    assert env["PATH"] == "/bin" and env["WALSHIP_REPO"] == "file:///r"
    tunables = dict(t.split("=") for t in env["GLIBC_TUNABLES"].split(":"))
    assert int(tunables["glibc.malloc.trim_threshold"]) >= 8 << 20
    assert int(tunables["glibc.malloc.mmap_threshold"]) > 1 << 20  # zstd's 1 MiB output


def test_helpers_keep_the_callers_own_tunables():
    env = spool.helper_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1:glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"].split(":") == [
        "glibc.malloc.trim_threshold=1", "glibc.malloc.arena_max=2",
        "glibc.malloc.mmap_threshold=4194304"]


def test_settings_fingerprint_ignores_the_tunables():
    env = {"WALSHIP_REPO": "file:///r"}
    assert spool.settings_fingerprint(env) == \
        spool.settings_fingerprint(spool.helper_environment(env))


def test_a_spawned_helper_gets_them(tmp_path, monkeypatch):
    (tmp_path / "envdump.py").write_text(
        "import os, sys\n"
        "open(sys.argv[1] + '.tmp', 'w').write(os.environ.get('GLIBC_TUNABLES', '-'))\n"
        "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n")
    monkeypatch.chdir(tmp_path)  # (python -m finds the module in its working directory)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    out = tmp_path / "seen"
    spool.spawn_detached("envdump", str(out), str(tmp_path / "log"))
    deadline = time.monotonic() + 30
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert out.read_text() == ":".join(spool.MALLOC_TUNABLES), (tmp_path / "log").read_text()
    assert "GLIBC_TUNABLES" not in os.environ
