"""walship.build_id: the build id names the sources a walship was built from, the build writes
it into the package, ``--version`` prints it, and the tests' ``walship_bin`` refuses a walship
built from other sources than the checkout under test."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.postgres import REPO_ROOT, check_build_id
from walship.build_id import installed_build_id, source_files, source_tree_id
from walship.entry import main


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of the checkout's sources (what the build id covers, and setup.py's neighbours)."""
    root = tmp_path / "src"
    for relative in [*source_files(str(REPO_ROOT)), "pyproject.toml", "README.md",
                     "MANIFEST.in"]:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / relative, root / relative)
    return root


def test_the_id_covers_the_package_the_launcher_and_the_build():
    files = source_files(str(REPO_ROOT))
    assert {"walship/cli.py", "walship/storage/azure.py", "native/launcher.c",
            "scripts/walship-py", "setup.py"} <= set(files)
    assert not [f for f in files if "__pycache__" in f or f.endswith("_build_stamp.py")]


def test_any_change_to_a_source_changes_the_id_and_nothing_else_does(tree):
    before = source_tree_id(str(tree))
    assert before == source_tree_id(str(REPO_ROOT))  # paths and contents only: not where
    (tree / "walship" / "__pycache__").mkdir(exist_ok=True)
    (tree / "walship" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    (tree / "walship" / "_build_stamp.py").write_text("BUILD_ID = 'old'\n")
    (tree / "docs.txt").write_text("not a source\n")
    assert source_tree_id(str(tree)) == before
    for relative in ("walship/wal.py", "native/launcher.c", "scripts/walship-py"):
        path = tree / relative
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert source_tree_id(str(tree)) != before, relative
        path.write_bytes(original)
    (tree / "walship" / "storage" / "new.py").write_text("")
    assert source_tree_id(str(tree)) != before


def test_the_build_stamps_the_package_with_its_sources_id(tree, tmp_path):
    """setup.py's build_py writes walship/_build_stamp.py with the id of the tree it builds
    (no git: the copy is not a repository, like an unpacked sdist)."""
    out = tmp_path / "build"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(out)],
                   cwd=tree, check=True, capture_output=True, timeout=120)
    stamp = (out / "walship" / "_build_stamp.py").read_text()
    assert f"BUILD_ID = {source_tree_id(str(tree))!r}" in stamp


def test_version_prints_the_build_id(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out == f"walship 0.1.0 (build {installed_build_id()})\n"
    assert main(["--debug", "--version"]) == 0  # through click, the same line
    assert capsys.readouterr().out == out


def test_a_walship_built_from_other_sources_is_refused():
    current = source_tree_id(str(REPO_ROOT))
    check_build_id("/opt/x/bin/walship", f"walship 0.1.0 (build {current})\n")
    for stale in ("walship 0.1.0 (build 0123456789abcdef)\n", "walship, version 0.1.0\n"):
        with pytest.raises(pytest.fail.Exception,
                           match=r"stale install: reinstall with pip install \."):
            check_build_id("/opt/x/bin/walship", stale)
