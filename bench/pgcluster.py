"""PostgreSQL clusters for the benchmark, run as the ``postgres`` OS user when started as root.

A :class:`Cluster` is a data directory with its own Unix-socket directory (no TCP). Every server
the harness starts is registered so that :func:`stop_all` can stop it on any exit path.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from pgwire import Connection, PgError

_RUNNING: list["Cluster"] = []


def bindir() -> Path:
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


BIN = bindir()


def os_user() -> pwd.struct_passwd | None:
    return pwd.getpwnam("postgres") if os.geteuid() == 0 else None


def as_postgres() -> dict:
    """subprocess keyword arguments that run a child as the postgres user (when we are root)."""
    user = os_user()
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}


def chown_tree(path: Path) -> None:
    user = os_user()
    if not user:
        return
    os.chown(path, user.pw_uid, user.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid, follow_symlinks=False)


def make_dir(path: Path) -> Path:
    """A world-traversable directory owned by the postgres user."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)
    user = os_user()
    if user:
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


def run_pg(args: list[str], env: dict[str, str] | None = None, check: bool = True,
           timeout: float | None = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run a command as the postgres user, output captured; raise with its output on failure."""
    proc = subprocess.run(args, env=env or base_env(), capture_output=True, text=True,
                          cwd=kwargs.pop("cwd", "/"), timeout=timeout, **as_postgres(), **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {proc.returncode}:\n"
                           f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


def base_env(home: str = "/tmp") -> dict[str, str]:
    return {"PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": home, "LC_ALL": "C",
            "LANG": "C"}


class Cluster:
    def __init__(self, data: Path, sockdir: Path, log: Path) -> None:
        self.data, self.sockdir, self.log = data, sockdir, log
        self.running = False

    @classmethod
    def initdb(cls, data: Path, sockdir: Path, log: Path) -> "Cluster":
        make_dir(sockdir)
        run_pg([str(BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                "--no-sync"])
        return cls(data, sockdir, log)

    def configure(self, **settings: object) -> None:
        """Append settings to postgresql.auto.conf (later lines win)."""
        lines = []
        for key, value in settings.items():
            if isinstance(value, str):
                value = "'" + value.replace("'", "''") + "'"
            elif isinstance(value, bool):
                value = "on" if value else "off"
            lines.append(f"{key} = {value}\n")
        with open(self.data / "postgresql.auto.conf", "a") as conf:
            conf.writelines(lines)

    def base_settings(self) -> None:
        self.configure(listen_addresses="", unix_socket_directories=str(self.sockdir),
                       port=5432, max_connections=20, shared_buffers="128MB",
                       wal_level="replica", max_wal_size="4GB", min_wal_size="1GB",
                       wal_keep_size="2GB", fsync=False, synchronous_commit=False,
                       full_page_writes=True, log_min_messages="warning",
                       log_line_prefix="%m [%p] ", logging_collector=False)

    def start(self, env: dict[str, str] | None = None, wait: bool = True) -> None:
        args = [str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                "-w" if wait else "-W", "-t", "600", "start"]
        _RUNNING.append(self)
        self.running = True
        run_pg(args, env=env)

    def stop(self, mode: str = "fast") -> None:
        if not self.running:
            return
        try:
            run_pg([str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "120",
                    "stop"], check=False)
        finally:
            self.running = False
            if self in _RUNNING:
                _RUNNING.remove(self)

    def connect(self, timeout: float = 60.0) -> Connection:
        """Connect, retrying while the server starts up (every 50 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return Connection(str(self.sockdir))
            except (OSError, PgError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def psql(self, sql: str) -> str:
        return run_pg([str(BIN / "psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
                       "-h", str(self.sockdir), "-U", "postgres", "-d", "postgres",
                       "-c", sql]).stdout.strip()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def stop_all() -> None:
    for cluster in list(_RUNNING):
        try:
            cluster.stop("immediate")
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


# When the harness last deleted a tree (see remove_tree and settle_removals).
_last_removal = 0.0

# ext4 without a journal (this machine's root filesystem: /sys/fs/ext4/*/journal_task is
# "<none>") will not reuse an inode deleted less than 60 s ago (300 s more while its inode table
# block is dirty), and finds that out by scanning: creating a file then costs time in proportion
# to the files deleted lately nearby. Measured here, a backup-fetch of 977 files took 0.59-0.63 s
# into a fresh directory and 1.10-1.22 s right after deleting the previous restore: a cost of
# the machine, paid by whichever tool comes next. In a feed after 4000 deletions, walship's
# prefetch worker (which creates a few files per segment) took 28.6-29.4 ms of CPU per segment
# instead of 22.5-23.3. Timed phases that create files start after settle_removals().
RECENT_DELETION_SECONDS = 61.0


def remove_tree(path: Path) -> None:
    """shutil.rmtree, remembering when (see settle_removals)."""
    global _last_removal
    shutil.rmtree(path, ignore_errors=True)
    _last_removal = time.monotonic()


def settle_removals(log=None) -> None:
    """Flush the filesystem and wait until the harness's last deletion is no longer recent to
    ext4 (see RECENT_DELETION_SECONDS), so that creating files costs what it costs on a
    filesystem that is not busy deleting."""
    os.sync()
    wait = _last_removal + RECENT_DELETION_SECONDS - time.monotonic()
    if wait > 0:
        if log is not None:
            log(f"waiting {wait:.0f} s for the last deletion to age (ext4 inode reuse)")
        time.sleep(wait)


def warm_memory(directory: Path, mib: int) -> float:
    """Write a scratch file of ``mib`` MiB in ``directory`` and delete it; return the seconds
    this took. Called right before every timed run, so that every run starts with the same
    memory at hand.

    Why: on a VM whose host takes back the memory its guest frees (free page reporting, as on
    the Firecracker machines this harness runs on), the first write to a page the host took
    back costs about 9 us, 2.4 s per GiB, where a page the guest used a moment ago costs
    nothing extra. A run that restores 1 GiB of WAL right after a fast run reuses that run's
    freed page cache; after a slow run or an idle wait (15 s is enough) it pays the host. In
    a lab feed (b) with no wait between runs, pgBackRest took 1.07-1.67 s and walship
    1.29-1.34 s; with 15 s idle before each run, 1.98-2.31 s and 1.83-2.08 s, about 1.3 s of
    CPU more each; with 15 s idle and then this scratch file, 1.14-1.35 s and 1.08-1.20 s.
    So every run starts warm, whatever ran before it (barman-cloud's slow runs, the waits of
    settle_removals).
    """
    if mib <= 0:
        return 0.0
    started = time.perf_counter()
    path = directory / ".warm-memory"
    chunk = bytes(16 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(max(1, mib // 16)):
            os.write(fd, chunk)
    finally:
        os.close(fd)
        os.unlink(path)
    return time.perf_counter() - started


def cold_cache() -> bool:
    """Flush dirty data and empty the page cache (as root), so that every tool's restore
    starts as on a fresh server: nothing of the previous run left to write back, no file of
    the tool already in memory. False where the kernel does not allow it."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError:
        return False
    return True


def copy_tree(src: Path, dst: Path) -> None:
    """cp -a (keeps the postgres ownership and modes; PostgreSQL insists on 0700 data dirs)."""
    if dst.exists():
        remove_tree(dst)
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def segment_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()
                  if len(p.name) == 24 and all(c in "0123456789ABCDEF" for c in p.name))


def ready_segments(data: Path) -> list[str]:
    status = data / "pg_wal" / "archive_status"
    names = [p.name[:-len(".ready")] for p in status.iterdir() if p.name.endswith(".ready")]
    return sorted(n for n in names if len(n) == 24)
