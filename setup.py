"""Builds the ``walship`` command; everything else is declared in pyproject.toml.

``walship`` is the native launcher (native/launcher.c says what it does and why) where a C
compiler works at install time, and otherwise a copy of the Python launcher ``walship-py``: the
same program, a few milliseconds slower per prefetched segment. ``WALSHIP_NATIVE_LAUNCHER=0``
at install time chooses the Python launcher.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup
from setuptools.dist import Distribution

# setuptools registers distutils' build_scripts (it has no module of its own for it).
build_scripts = Distribution().get_command_class("build_scripts")

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "native", "launcher.c")


def _compilers() -> list[list[str]]:
    candidates = [os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc"]
    found = []
    for candidate in candidates:
        words = shlex.split(candidate) if candidate else []
        if words and shutil.which(words[0]) and words not in found:
            found.append(words)
    return found


def compile_launcher(target: str) -> bool:
    """Compile the native launcher to ``target``; False (and a warning) where it cannot."""
    if sys.platform != "linux":
        print("walship: the native launcher is Linux-only; using the Python launcher")
        return False
    reasons = []
    for compiler in _compilers():
        command = [*compiler, "-O2", "-Wall", "-o", target, SOURCE]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as error:
            reasons.append(f"{compiler[0]}: {error}")
            continue
        if result.returncode == 0:
            return True
        reasons.append(f"{compiler[0]}: {result.stderr.strip()[-400:]}")
    print("walship: WARNING: no C compiler could build the native launcher "
          f"({'; '.join(reasons) or 'none found'}); using the Python launcher, which is "
          "slower per prefetched WAL segment (install gcc, then walship again)", file=sys.stderr)
    return False


class BuildScripts(build_scripts):
    """Copies ``walship-py`` (its ``#!`` line made to name the installing Python), then builds
    ``walship`` beside it."""

    def run(self) -> None:
        super().run()
        target = os.path.join(self.build_dir, "walship")
        if os.path.exists(target):
            os.unlink(target)
        if os.environ.get("WALSHIP_NATIVE_LAUNCHER", "1") == "0" or not compile_launcher(target):
            shutil.copy2(os.path.join(self.build_dir, "walship-py"), target)


class PlatformDistribution(Distribution):
    """A native program inside: the wheel is for this platform only."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_scripts": BuildScripts}, distclass=PlatformDistribution)
