"""Where a drill runs, apart from any running server: PostgreSQL's OS user (``postgres``
when run as root, as PostgreSQL refuses root), the binaries of the backup's major version, a
free port (one in use is refused) and the scratch directory (absent or empty, never inside a
data directory; what the drill creates in it is all it removes)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from walship.errors import DrillFailed, UsageError

SOCKET_DIRS = ("/var/run/postgresql", "/run/postgresql", "/tmp")


@dataclass(frozen=True)
class Runner:
    """Runs PostgreSQL's programs as its OS user: ``postgres`` when the drill runs as root
    (PostgreSQL refuses to run as root), else the current user."""

    user: pwd.struct_passwd | None

    @classmethod
    def for_current_user(cls) -> Runner:
        if os.geteuid() != 0:
            return cls(None)
        try:
            return cls(pwd.getpwnam("postgres"))
        except KeyError:
            raise UsageError("running as root and there is no postgres user",
                             "PostgreSQL refuses to run as root",
                             "run walship drill as PostgreSQL's OS user") from None

    @property
    def name(self) -> str:
        return (self.user or pwd.getpwuid(os.geteuid())).pw_name

    def own(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid, follow_symlinks=False)

    def run(self, args: list[str], *, env: Mapping[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        try:
            return subprocess.run(args, env=dict(env) if env is not None else None,
                                  capture_output=True, text=True, timeout=timeout, cwd="/",
                                  check=False, stdin=subprocess.DEVNULL, **kwargs)
        except subprocess.TimeoutExpired:
            raise DrillFailed(f"{Path(args[0]).name} did not finish in {timeout:.0f} s",
                              " ".join(args[1:4])) from None
        except OSError as error:
            raise DrillFailed(f"cannot run {args[0]}", os.strerror(error.errno or 0)) from None


def find_bindir(explicit: str | None, major: int) -> Path:
    """PostgreSQL's binaries for ``major``: ``explicit``, else ``pg_config --bindir`` when it is
    that version, else Debian's ``/usr/lib/postgresql/MAJOR/bin``."""
    if explicit:
        path = Path(explicit)
        if not (path / "pg_ctl").is_file():
            raise UsageError(f"no pg_ctl in {explicit}", hint="give --pg-bindir the directory "
                             "of PostgreSQL's server programs")
        return path
    candidates = []
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                             check=False, timeout=30).stdout.strip()
        if out:
            candidates.append(Path(out))
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append(Path(f"/usr/lib/postgresql/{major}/bin"))
    for path in candidates:
        if (path / "pg_ctl").is_file() and _major_of(path) == major:
            return path
    raise UsageError(f"PostgreSQL {major}'s server programs were not found", "the backup is of "
                     f"PostgreSQL {major}; pg_config --bindir is another version or absent",
                     f"install them (Debian: apt-get install postgresql-{major}) or give "
                     "--pg-bindir")


def _major_of(bindir: Path) -> int | None:
    try:
        out = subprocess.run([str(bindir / "pg_ctl"), "--version"], capture_output=True,
                             text=True, check=False, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(match[1]) if match else None


def port_in_use(port: int) -> str | None:
    """Why ``port`` cannot be used (a TCP listener or a socket file), or None."""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno in (98, 13):  # EADDRINUSE, EACCES
                return f"{host} port {port} is in use"
        finally:
            probe.close()
    for directory in SOCKET_DIRS:
        if os.path.lexists(os.path.join(directory, f".s.PGSQL.{port}")):
            return f"a server's socket {directory}/.s.PGSQL.{port} exists"
    return None


def choose_port(port: int | None) -> int:
    if port is not None:
        if not 1024 <= port <= 65535:
            raise UsageError(f"invalid port {port}", "use 1024 to 65535")
        why = port_in_use(port)
        if why:
            raise UsageError(f"port {port} is in use", why, "the drill never shares a port "
                             "with a server: choose another --port, or none (a free one)")
        return port
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            candidate = probe.getsockname()[1]
        if candidate >= 1024 and port_in_use(candidate) is None:
            return candidate
    raise DrillFailed("no free port was found", hint="give one with --port")


@dataclass(frozen=True)
class Scratch:
    """The drill's scratch directory: ``data/`` (the restored cluster), ``run/`` (socket,
    server log, pg_hba.conf) and tablespaces under ``tablespaces/``."""

    root: Path
    created: bool  # we made root (else it was an empty directory: only its content is ours)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.run / "postgres.log"


def make_scratch(path: str | None, runner: Runner) -> Scratch:
    """Create the scratch directory (``path`` must be absent or an empty directory; its parent
    must exist), or a new one under /var/tmp."""
    if path is None:
        root = Path(tempfile.mkdtemp(prefix="walship-drill-", dir="/var/tmp"))
        created = True
    else:
        root = Path(os.path.abspath(path))
        if any(ord(c) < 32 or c == "\x7f" for c in str(root)):
            raise UsageError("the scratch directory's name holds control characters",
                             hint="choose a plain path")
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            raise UsageError(f"scratch directory {root} is not a directory")
        for parent in root.parents:
            if (parent / "PG_VERSION").is_file():
                raise UsageError(f"scratch directory {root} is inside the PostgreSQL data "
                                 f"directory {parent}", "a drill never writes into a "
                                 "server's directory", "choose a directory outside it")
        if root.exists():
            if os.listdir(root):
                raise UsageError(f"scratch directory {root} is not empty", "it may be in use "
                                 "(a server's data, another drill)", "give an empty or new "
                                 "directory; the drill removes what it creates")
            created = False
        else:
            if not root.parent.is_dir():
                raise UsageError(f"cannot create scratch directory {root}",
                                 f"{root.parent} does not exist", "create it first")
            try:
                os.mkdir(root, 0o700)
            except OSError as error:
                raise UsageError(f"cannot create scratch directory {root}",
                                 os.strerror(error.errno or 0)) from None
            created = True
    if len(str(root)) > 80:  # the socket's path must fit in 107 bytes
        if created:
            shutil.rmtree(root, ignore_errors=True)
        raise UsageError(f"scratch directory {root} has too long a path",
                         "the server's socket inside it would exceed the 107-byte limit",
                         "choose a shorter path")
    scratch = Scratch(root, created)
    if created:
        os.chmod(root, 0o700)
        runner.own(root)
    for sub in (scratch.data, scratch.run):
        os.mkdir(sub, 0o700)
        runner.own(sub)
    return scratch


def remove_scratch(scratch: Scratch) -> None:
    """Remove what the drill created: the whole directory, or its content when it existed."""
    if scratch.created:
        shutil.rmtree(scratch.root, ignore_errors=True)
        return
    for entry in os.listdir(scratch.root):
        path = scratch.root / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass
