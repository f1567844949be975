"""The container image's scripts, run outside a container against a real PostgreSQL.

These machines have no container engine, so everything the image does is tested here through
the very files it runs: ``docker/walship-entrypoint.sh`` (its ENTRYPOINT), which execs the
official image's ``docker-entrypoint.sh`` (a verbatim copy in this directory; only the path of
``/docker-entrypoint-initdb.d`` is pointed at a directory of the test's own), which runs
``docker/initdb-walship.sh`` on a fresh data directory. The scripts run as the ``postgres`` OS
user, as in the image (``USER 999:999``), with the environment a container would get.

The official entrypoint's temporary server is reached by its init scripts through libpq's
default socket directory (it clears PGHOST), so the servers here listen there too, each on a
port of its own (no TCP: ``listen_addresses`` is empty).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fixtures.postgres import PgWorkspace, _as_user, chown_to

REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO_ROOT / "docker" / "walship-entrypoint.sh"
INITDB_SCRIPT = REPO_ROOT / "docker" / "initdb-walship.sh"
OFFICIAL = Path(__file__).with_name("official-docker-entrypoint.sh")
DEFAULT_SOCKET_DIR = "/var/run/postgresql"  # Debian's and the image's libpq default

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Container:
    """One "container": a PGDATA, the scripts in place, and the environment it runs with."""

    ws: PgWorkspace
    name: str
    repo_env: dict[str, str]
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=_free_port)
    server: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.root = self.ws.make_dir(self.ws.path / self.name)
        self.pgdata = self.root / "data"  # absent: the official entrypoint makes it
        self.log = self.root / "container.log"
        initdb_d = self.ws.make_dir(self.root / "docker-entrypoint-initdb.d")
        script = initdb_d / "10-walship.sh"
        script.write_bytes(INITDB_SCRIPT.read_bytes())
        os.chmod(script, 0o755)
        official = OFFICIAL.read_text()
        assert official.count("/docker-entrypoint-initdb.d/") == 2
        self.official = self.root / "docker-entrypoint.sh"
        self.official.write_text(official.replace("/docker-entrypoint-initdb.d/",
                                                  f"{initdb_d}/"))
        os.chmod(self.official, 0o755)
        # a copy: the checkout may not be readable by the server's user (e.g. under /root)
        self.entrypoint = self.root / "walship-entrypoint.sh"
        self.entrypoint.write_bytes(ENTRYPOINT.read_bytes())
        os.chmod(self.entrypoint, 0o755)
        for path in (script, self.official, self.entrypoint):
            chown_to(path, self.ws.user)

    def env(self) -> dict[str, str]:
        env = {"PATH": f"{self.ws.bindir}:/usr/local/bin:/usr/bin:/bin",
               "HOME": str(self.root), "LC_ALL": "C", "LANG": "C", "TZ": "UTC",
               "PGDATA": str(self.pgdata), "PGPORT": str(self.port),
               "POSTGRES_PASSWORD": "not-a-secret-test-password",
               "WALSHIP_CONFIG": os.devnull, "WALSHIP_BIN": self.ws.walship,
               "WALSHIP_PG_ENTRYPOINT": str(self.official)}
        env.update(self.repo_env)
        env.update(self.extra_env)
        return env

    def args(self) -> list[str]:
        """``docker run IMAGE`` runs CMD ``postgres``; settings as a user would add them."""
        return [str(self.entrypoint), "postgres", "-c", "listen_addresses=", "-c", "fsync=off",
                "-c", "shared_buffers=32MB", "-c", "max_connections=20",
                "-c", f"unix_socket_directories={DEFAULT_SOCKET_DIR}"]

    def start(self) -> None:
        """Run the entrypoint in the background, as the image's user, until it serves."""
        with open(self.log, "ab") as out:
            self.server = subprocess.Popen(self.args(), env=self.env(), cwd=self.root,
                                           stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, **_as_user(self.ws.user))
        self.ws.processes.append(self.server)
        deadline = time.monotonic() + 180
        while self.try_sql("SELECT 1") != "1":
            if self.server.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.server.returncode}:\n"
                                     f"{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not serve in time:\n{self.log_text()}")
            time.sleep(0.2)
        # the official entrypoint's temporary server answers too: wait for the real one
        while "PostgreSQL init process complete" not in self.log_text() and \
                "Skipping initialization" not in self.log_text():
            assert time.monotonic() < deadline, self.log_text()
            time.sleep(0.2)
        while self.try_sql("SELECT 1") != "1":
            assert self.server.poll() is None, self.log_text()
            assert time.monotonic() < deadline, self.log_text()
            time.sleep(0.2)

    def stop(self) -> None:
        """What `docker stop` does: the image's STOPSIGNAL, SIGINT (fast shutdown)."""
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGINT)
            self.server.wait(timeout=90)

    def run(self, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the entrypoint in the foreground (for starts that must stop)."""
        return subprocess.run(self.args(), env=self.env(), cwd=self.root, capture_output=True,
                              text=True, timeout=timeout, check=False, **_as_user(self.ws.user))

    def _psql(self, sql: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.ws.bindir / "psql"), "-X", "-A", "-t", "-q",
                               "-v", "ON_ERROR_STOP=1", "-h", DEFAULT_SOCKET_DIR,
                               "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                               "-c", sql], capture_output=True, text=True, timeout=60, check=False,
                              env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "5"},
                              cwd="/")

    def sql(self, sql: str) -> str:
        proc = self._psql(sql)
        assert proc.returncode == 0, f"{sql}: {proc.stderr}\n{self.log_text()}"
        return proc.stdout.strip()

    def try_sql(self, sql: str) -> str | None:
        proc = self._psql(sql)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def walship(self, *args: str) -> subprocess.CompletedProcess[str]:
        """walship as `kubectl exec` would run it in the container (the server's user)."""
        env = self.env() | {"PGHOST": DEFAULT_SOCKET_DIR}
        return subprocess.run([self.ws.walship, *args], env=env, cwd="/", capture_output=True,
                              text=True, timeout=300, check=False, **_as_user(self.ws.user))

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_archived(self, wal_file: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while (self.try_sql("SELECT last_archived_wal FROM pg_stat_archiver") or "") < wal_file:
            assert time.monotonic() < deadline, (
                f"{wal_file} not archived: "
                f"{self.try_sql('SELECT * FROM pg_stat_archiver')}\n{self.log_text()}")
            time.sleep(0.2)


@pytest.fixture
def container(pg):
    made: list[Container] = []

    def make(name: str, repo_env: dict[str, str], **extra: str) -> Container:
        made.append(Container(pg, name, repo_env, dict(extra)))
        return made[-1]

    yield make
    for each in made:
        with contextlib.suppress(Exception):  # the workspace kills what is left
            each.stop()


def _repository(request, kind: str) -> dict[str, str]:
    if kind == "file":
        return dict(request.getfixturevalue("file_repository").env)
    return dict(request.getfixturevalue("azure_repository").env)


# -- a fresh data directory, then a restore into an empty one ---------------------------------
@pytest.mark.parametrize("kind", ["file", "azure"])
def test_fresh_cluster_archives_and_an_empty_one_is_restored(container, pg, request, kind):
    repo_env = _repository(request, kind)
    repo_env["WALSHIP_ENCRYPTION_KEY_FILE"] = str(pg.key_file())
    primary = container("primary", repo_env, WALSHIP_ARCHIVE_TIMEOUT="30")
    primary.start()
    assert "initdb-walship: archiving through" in primary.log_text()
    assert primary.sql("SHOW archive_mode") == "on"
    assert primary.sql("SHOW archive_command") == f"{pg.walship} wal-push %p"
    assert primary.sql("SHOW archive_timeout") == "30s"

    primary.sql("CREATE TABLE accounts (id int PRIMARY KEY, owner text)")
    primary.sql("INSERT INTO accounts SELECT g, 'before ' || g FROM generate_series(1, 500) g")
    primary.wait_archived(primary.sql("SELECT pg_walfile_name(pg_switch_wal())"))
    pushed = primary.walship("backup-push")
    assert pushed.returncode == 0, pushed.stderr
    # written after the backup: the restore must replay it from the archive
    primary.sql("INSERT INTO accounts SELECT g, 'after ' || g FROM generate_series(501, 900) g")
    expected = primary.sql("SELECT count(*) || ':' || md5(string_agg(owner, ',' ORDER BY id)) "
                           "FROM accounts")
    primary.wait_archived(primary.sql("SELECT pg_walfile_name(pg_switch_wal())"))
    primary.stop()

    restored = container("restored", repo_env, WALSHIP_RESTORE="LATEST")
    restored.start()
    log = restored.log_text()
    assert "walship-entrypoint: restoring LATEST" in log
    assert "Skipping initialization" in log  # the official entrypoint found the database
    assert "initdb-walship" not in log  # a restored cluster keeps its own settings
    deadline = time.monotonic() + 120
    while restored.sql("SELECT pg_is_in_recovery()") != "f":
        assert time.monotonic() < deadline, restored.log_text()
        time.sleep(0.2)
    assert restored.sql("SELECT count(*) || ':' || md5(string_agg(owner, ',' ORDER BY id)) "
                        "FROM accounts") == expected
    # it archives on as the primary did (a new timeline, into the same repository)
    assert restored.sql("SHOW archive_command") == f"{pg.walship} wal-push %p"
    restored.wait_archived(restored.sql("SELECT pg_walfile_name(pg_switch_wal())"))

    # a restart of the restored container: a database is there, nothing is restored again
    restored.stop()
    restored.start()
    assert "holds a database: WALSHIP_RESTORE=LATEST ignored" in restored.log_text()
    assert restored.sql("SELECT count(*) FROM accounts") == "900"


def test_restore_as_a_standby_at_a_named_backup(container, pg, file_repository):
    primary = container("primary", file_repository.env)
    primary.start()
    primary.sql("CREATE TABLE t AS SELECT generate_series(1, 100) AS n")
    assert primary.walship("backup-push").returncode == 0
    primary.sql("INSERT INTO t SELECT generate_series(101, 150)")
    primary.wait_archived(primary.sql("SELECT pg_walfile_name(pg_switch_wal())"))
    listed = primary.walship("backup-list", "--json")
    import json

    name = json.loads(listed.stdout)[0]["name"]
    standby = container("standby", file_repository.env, WALSHIP_RESTORE=name,
                        WALSHIP_RESTORE_STANDBY="on")
    standby.start()
    assert (standby.pgdata / "standby.signal").exists()
    assert standby.sql("SELECT pg_is_in_recovery()") == "t"
    deadline = time.monotonic() + 60
    while standby.try_sql("SELECT count(*) FROM t") != "150":
        assert time.monotonic() < deadline, standby.log_text()
        time.sleep(0.2)
    primary.stop()


# -- bad or missing settings stop the start, with one line --------------------------------------
def _fake_official(ws: PgWorkspace, root: Path) -> Path:
    """A stand-in for docker-entrypoint.sh that only records that it was reached."""
    fake = root / "fake-entrypoint.sh"
    fake.write_text('#!/bin/sh\necho "reached as $(id -u): $*" > "$HOME/reached"\n')
    os.chmod(fake, 0o755)
    return fake


BAD_SETTINGS = {
    "no repository": ({"WALSHIP_REPO": None}, "no repository is configured"),
    "bad repository URL": ({"WALSHIP_REPO": "http://example.invalid/x"},
                           "unsupported repository URL"),
    "missing key file": ({"WALSHIP_ENCRYPTION_KEY_FILE": "/nonexistent/key"},
                         "encryption key file /nonexistent/key does not exist"),
    "archive timeout not a number": ({"WALSHIP_ARCHIVE_TIMEOUT": "60; DROP TABLE x"},
                                     "WALSHIP_ARCHIVE_TIMEOUT must be a whole number"),
    "archive timeout with a unit": ({"WALSHIP_ARCHIVE_TIMEOUT": "1min"},
                                    "WALSHIP_ARCHIVE_TIMEOUT must be a whole number"),
    "standby not on or off": ({"WALSHIP_RESTORE": "LATEST", "WALSHIP_RESTORE_STANDBY": "maybe"},
                              "WALSHIP_RESTORE_STANDBY must be on or off"),
    "bad target action": ({"WALSHIP_RESTORE": "LATEST",
                           "WALSHIP_RESTORE_TARGET_ACTION": "explode"},
                          "WALSHIP_RESTORE_TARGET_ACTION must be promote, pause or shutdown"),
    "restore neither LATEST nor a name": ({"WALSHIP_RESTORE": "latest\n--force"},
                                          "WALSHIP_RESTORE must be LATEST or a backup's name"),
    "target time without restore": ({"WALSHIP_RESTORE_TARGET_TIME": "2026-01-01 00:00+00"},
                                    "need WALSHIP_RESTORE"),
    "repository unreachable for a restore": ({"WALSHIP_REPO": "file:///nonexistent/repo",
                                              "WALSHIP_RESTORE": "LATEST"},
                                             "nothing to restore from"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_or_missing_settings_stop_the_start_with_one_line(container, pg, file_repository,
                                                              case):
    changes, reason = BAD_SETTINGS[case]
    box = container("box", file_repository.env)
    fake = _fake_official(pg, box.root)
    env = box.env() | {"WALSHIP_PG_ENTRYPOINT": str(fake)}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run(box.args(), env=env, cwd=box.root, capture_output=True, text=True,
                          timeout=120, check=False, **_as_user(pg.user))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("walship-entrypoint: ERROR: "), lines
    assert reason in lines[0]
    assert "PostgreSQL not started" in lines[0] or "walship-entrypoint: ERROR: WALSHIP_" in lines[0]
    assert not (box.root / "reached").exists()
    assert not box.pgdata.exists()


@pytest.mark.parametrize("restore, extra, reason", [
    ("20200101T000000Z", {}, "restore failed: "),  # no such backup
    ("LATEST", {}, "restore failed: "),  # an empty repository: no backup to restore
    ("LATEST", {"WALSHIP_RESTORE_TARGET_TIME": "yesterday"}, "restore failed: "),
])
def test_a_restore_that_cannot_happen_stops_the_start(container, pg, file_repository, restore,
                                                      extra, reason):
    box = container("box", file_repository.env)
    fake = _fake_official(pg, box.root)
    env = box.env() | {"WALSHIP_PG_ENTRYPOINT": str(fake), "WALSHIP_RESTORE": restore} | extra
    proc = subprocess.run(box.args(), env=env, cwd=box.root, capture_output=True, text=True,
                          timeout=120, check=False, **_as_user(pg.user))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr
    assert last.startswith("walship-entrypoint: ERROR: restore failed: "), proc.stderr
    assert last.endswith("PostgreSQL not started")
    assert "exited" not in last  # walship's own reason, not just a status
    assert not (box.root / "reached").exists()
    assert not (box.pgdata / "PG_VERSION").exists()


def test_restore_refuses_a_non_empty_directory_without_a_database(container, pg,
                                                                   file_repository):
    box = container("box", file_repository.env)
    fake = _fake_official(pg, box.root)
    pg.make_dir(box.pgdata, 0o700)
    (box.pgdata / "lost+found").mkdir()
    env = box.env() | {"WALSHIP_PG_ENTRYPOINT": str(fake), "WALSHIP_RESTORE": "LATEST"}
    proc = subprocess.run(box.args(), env=env, cwd=box.root, capture_output=True, text=True,
                          timeout=120, check=False, **_as_user(pg.user))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "is not empty and holds no database" in proc.stderr
    assert not (box.root / "reached").exists()


def test_an_unreachable_repository_warns_but_an_existing_database_starts(container, pg,
                                                                          file_repository):
    box = container("box", {"WALSHIP_REPO": "file:///nonexistent/repo"})
    fake = _fake_official(pg, box.root)
    env = box.env() | {"WALSHIP_PG_ENTRYPOINT": str(fake)}
    proc = subprocess.run(box.args(), env=env, cwd=box.root, capture_output=True, text=True,
                          timeout=120, check=False, **_as_user(pg.user))
    assert proc.returncode == 0, proc.stderr
    assert "walship-entrypoint: WARNING: repository directory /nonexistent/repo does not " \
           "exist" in proc.stderr
    assert (box.root / "reached").read_text().startswith(f"reached as {pg.user.pw_uid}: postgres")


def test_other_commands_pass_straight_through(container, pg):
    box = container("box", {})  # no settings at all: a shell needs none
    fake = _fake_official(pg, box.root)
    env = box.env() | {"WALSHIP_PG_ENTRYPOINT": str(fake)}
    proc = subprocess.run([str(box.entrypoint), "bash", "-c", "true"], env=env, cwd=box.root,
                          capture_output=True, text=True, timeout=60, check=False,
                          **_as_user(pg.user))
    assert proc.returncode == 0, proc.stderr
    assert (box.root / "reached").read_text().strip().endswith(": bash -c true")


def test_as_root_it_hands_over_to_the_postgres_user(container, pg, file_repository):
    if os.geteuid() != 0:
        pytest.skip("needs root: it tests what the image does under `docker run --user root`")
    box = container("box", file_repository.env)
    fake = _fake_official(pg, box.root)
    gosu = box.root / "gosu"  # gosu's interface (USER COMMAND...), by util-linux's setpriv
    gosu.write_text('#!/bin/sh\nu=$1; shift\nexec setpriv --reuid="$u" --regid="$u" '
                    '--init-groups -- "$@"\n')
    os.chmod(gosu, 0o755)
    box.pgdata.mkdir(mode=0o755)  # a volume mounted root-owned
    env = box.env() | {"WALSHIP_PG_ENTRYPOINT": str(fake), "WALSHIP_GOSU": str(gosu)}
    proc = subprocess.run(box.args(), env=env, cwd=box.root, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (box.root / "reached").read_text().startswith(f"reached as {pg.user.pw_uid}: ")
    assert box.pgdata.stat().st_uid == pg.user.pw_uid
    assert oct(box.pgdata.stat().st_mode & 0o777) == "0o700"


def test_initdb_script_refuses_what_it_cannot_put_in_archive_command(pg, tmp_path):
    for env, reason in (({"WALSHIP_BIN": "/opt/my walship/bin/walship"},
                         "WALSHIP_BIN may hold only"),
                        ({"WALSHIP_BIN": "walship"}, "must be an absolute path"),
                        ({"WALSHIP_ARCHIVE_TIMEOUT": "1min"}, "must be a whole number"),
                        ({"WALSHIP_ARCHIVE_TIMEOUT": "99999999"}, "too large")):
        proc = subprocess.run([str(INITDB_SCRIPT)], env={"PATH": "/usr/bin:/bin", **env},
                              capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and reason in proc.stderr, proc.stderr
