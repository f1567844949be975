"""walship.fastpath: what answering a call whose work was done ahead loads."""

from __future__ import annotations

import subprocess
import sys

# Modules the fast path must not load: each costs a call milliseconds, and the fast path is
# there to make such a call cost little more than starting Python (typing alone: about 6 ms
# of CPU here, as much as the interpreter's own start).
HEAVY = ("typing", "hashlib", "ssl", "http.client", "zstandard", "logging", "json",
         "concurrent.futures", "walship.cli", "walship.archive", "walship.config", "click")


def test_the_fast_path_loads_nothing_heavy():
    code = ("import sys, walship.entry, walship.fastpath, walship.spool\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    assert loaded == []
