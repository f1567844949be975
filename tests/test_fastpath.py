"""walship.fastpath: what answering a call whose work was done ahead loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from walship import fastpath

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


@pytest.mark.parametrize("name", ["000000010000000000000001\n", "00000002.history\n",
                                  "000000010000000000000001.partial\n",
                                  "000000010000000000000001.00000028.backup\n"])
def test_a_name_with_a_trailing_newline_goes_to_the_full_program(name):
    """The full program refuses it (walship.wal matches names in full); the fast path must not
    answer it from a record or the cache."""
    assert not fastpath._plain_name(name)
    assert fastpath._plain_name(name[:-1])
