"""The build id: which source tree an installed walship was built from.

The id is a hash of the contents (and relative paths) of the files the program is made of: the
package's Python modules, the native launcher's C source, the ``walship-py`` script and
``setup.py``, which builds them. It needs no git, so it is the same whether the program is built
from a clone, an sdist or a checkout with uncommitted changes, and it changes with any of them.

``setup.py`` computes it (loading this file by path: nothing of the package is imported at
build time) and writes it into the generated module ``walship/_build_stamp.py`` of the built
package; ``walship --version`` prints it. The tests compute the id of the checkout under test
the same way and refuse to run PostgreSQL against a ``walship`` built from other sources (a
stale install). Standard library only, and nothing read at import time: ``--version`` stays
cheap.
"""

from __future__ import annotations

import hashlib
import os

STAMP_MODULE = "_build_stamp"  # walship/_build_stamp.py, written by setup.py's build_py
ID_LENGTH = 16  # hex digits shown: 64 bits, plenty to tell two source trees apart
# (directory, file name suffix) of the sources, relative to the tree's root
_SOURCES = (("walship", ".py"), ("native", ".c"), ("native", ".h"))
_SINGLE_FILES = ("scripts/walship-py", "setup.py")


def source_files(root: str) -> list[str]:
    """The source files of the tree at ``root`` that the build id covers, as sorted relative
    paths with ``/`` separators (the generated stamp and byte-code excluded)."""
    found: set[str] = set()
    for directory, suffix in _SOURCES:
        top = os.path.join(root, directory)
        for here, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if not name.endswith(suffix) or name == f"{STAMP_MODULE}.py":
                    continue
                found.add(os.path.relpath(os.path.join(here, name), root).replace(os.sep, "/"))
    for relative in _SINGLE_FILES:
        if os.path.isfile(os.path.join(root, relative)):
            found.add(relative)
    return sorted(found)


def source_tree_id(root: str) -> str:
    """The build id of the source tree at ``root``: a hash of its source files' paths and
    contents (see :func:`source_files`)."""
    digest = hashlib.sha256()
    for relative in source_files(root):
        with open(os.path.join(root, relative), "rb") as handle:
            content = handle.read()
        digest.update(f"{relative}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()[:ID_LENGTH]


def installed_build_id() -> str:
    """The id this walship was built with; for a package run from its source tree (no stamp:
    an editable install, or ``python -m walship`` in a checkout), that tree's id."""
    try:
        from walship._build_stamp import BUILD_ID  # type: ignore[import-not-found]
    except ImportError:
        package = os.path.dirname(os.path.abspath(__file__))
        root = os.path.dirname(package)
        if os.path.isfile(os.path.join(root, "native", "launcher.c")):
            return source_tree_id(root)
        return "unknown"
    return str(BUILD_ID)


def version_line() -> str:
    """What ``walship --version`` prints: ``walship VERSION (build ID)``."""
    from walship import __version__

    return f"walship {__version__} (build {installed_build_id()})"
