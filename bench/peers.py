"""The tools being compared, each as PostgreSQL calls it: an archive_command, a restore_command,
the server environment they need, and whatever has to exist in the repository first.

Every tool writes zstd to its own container in the same Azurite, over HTTPS: the peers at
level 3 (pgBackRest's default for zst), walship at its default (level 1 tuned for WAL, which
stores less than level 3 on WAL; see walship/codec):

* walship: ``walship wal-push %p`` / ``walship wal-fetch %f %p``, defaults otherwise (push-ahead
  and prefetch on, compression as shipped). Verification on, the self-signed cert given as trust anchor.
* pgBackRest (Debian's package): ``archive-push`` / ``archive-get`` with ``archive-async=y`` and
  ``process-max=2`` (its documented way to go fast), and a second archive row without async.
  Its TLS client matches only DNS names (not IP addresses) against the certificate, so it
  connects to ``localhost`` (the certificate's DNS name) with ``repo1-storage-ca-file`` and
  verification on; only where ``localhost`` does not resolve to 127.0.0.1 first does it fall back
  to 127.0.0.1 with ``repo1-storage-verify-tls=n``.
* barman-cloud (barman[azure] from PyPI, its own venv): ``barman-cloud-wal-archive --zstd`` /
  ``barman-cloud-wal-restore``, defaults otherwise (its restore has ``--parallel``, off by
  default). Emulator URL form ``https://127.0.0.1:PORT/ACCOUNT/CONTAINER`` plus
  ``AZURE_STORAGE_CONNECTION_STRING``, as barman's own source requires for emulated storage;
  verification on (REQUESTS_CA_BUNDLE). Restores are also measured with its ``--parallel 3``.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pgcluster
from azurite import ACCOUNT, KEY, Azurite

STANZA = "bench"
BARMAN_SERVER = "bench"
LEVEL = 3  # the peers' zstd level


@dataclass
class Context:
    azurite: Azurite
    cert: Path
    walship: str             # the walship executable
    barman_bin: Path         # the barman venv's bin/
    pgbackrest: str          # the pgbackrest executable


class Tool:
    key = ""                 # result key, and container prefix of the archive it fills
    archive_key = ""         # whose archive (b) and (c) read (default: its own)
    label = ""
    fetch_label = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.archive_key = self.archive_key or self.key

    def env(self, container: str, home: Path) -> dict[str, str]:
        return pgcluster.base_env(str(home))

    def create_repo(self, container: str) -> None:
        self.ctx.azurite.create_container(container)

    def usage(self, container: str) -> tuple[int, int]:
        """(objects, bytes) stored in the tool's repository."""
        return self.ctx.azurite.container_usage(container)

    def prepare(self, container: str, run_dir: Path, data: Path, sockdir: Path) -> None:
        """Make the repository ready for archiving (server running, archiving not yet on)."""

    def archive_command(self, container: str, run_dir: Path, data: Path, sockdir: Path) -> str:
        raise NotImplementedError

    def restore_command(self, container: str, run_dir: Path, data: Path) -> str:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError


class Walship(Tool):
    key, label = "walship", "walship"
    file_root: Path | None = None   # development only: a file:// repository, not Azurite

    def __init__(self, ctx: Context, exe: str | None = None) -> None:
        super().__init__(ctx)
        self.exe = exe or ctx.walship

    def create_repo(self, container: str) -> None:
        if self.file_root:
            pgcluster.make_dir(self.file_root / container)
        else:
            super().create_repo(container)

    def usage(self, container: str) -> tuple[int, int]:
        if not self.file_root:
            return super().usage(container)
        sizes = [p.stat().st_size for p in (self.file_root / container).rglob("*") if p.is_file()]
        return len(sizes), sum(sizes)

    def env(self, container: str, home: Path) -> dict[str, str]:
        env = super().env(container, home)
        repo = (f"file://{self.file_root / container}" if self.file_root
                else f"azure://{container}/cluster")
        env.update(WALSHIP_REPO=repo,
                   AZURE_STORAGE_CONNECTION_STRING=self.ctx.azurite.connection_string,
                   REQUESTS_CA_BUNDLE=str(self.ctx.cert), SSL_CERT_FILE=str(self.ctx.cert))
        return env

    def archive_command(self, container, run_dir, data, sockdir) -> str:
        return f"{shlex.quote(self.exe)} wal-push %p"

    def restore_command(self, container, run_dir, data) -> str:
        return f"{shlex.quote(self.exe)} wal-fetch %f %p"

    def push_command(self, path: str) -> list[str]:
        return [self.exe, "wal-push", path]

    def fetch_command(self, name: str, dest: str) -> list[str]:
        return [self.exe, "wal-fetch", name, dest]

    def version(self) -> str:
        out = subprocess.run([self.exe, "--version"], capture_output=True, text=True)
        return out.stdout.strip().replace("walship, version ", "")


class WalshipBaseline(Walship):
    """Another walship installation (the code before a change), measured beside the current one
    in the same run: --walship-baseline."""

    key, label = "walship-baseline", "walship baseline (see --walship-baseline)"


class PgBackRest(Tool):
    key, label = "pgbackrest-async", "pgBackRest (async, process-max=2)"
    archive_async = True

    @staticmethod
    def verify_tls() -> bool:
        """Whether pgBackRest can reach Azurite as ``localhost`` (and so verify its
        certificate): only when localhost resolves to 127.0.0.1 first."""
        try:
            first = socket.getaddrinfo("localhost", 443, type=socket.SOCK_STREAM)[0]
        except OSError:
            return False
        return first[4][0] == "127.0.0.1"

    def config_path(self, run_dir: Path) -> Path:
        return run_dir / "pgbackrest.conf"

    def write_config(self, container: str, run_dir: Path, data: Path, sockdir: Path) -> Path:
        spool = pgcluster.make_dir(run_dir / "pgbackrest-spool")
        logs = pgcluster.make_dir(run_dir / "pgbackrest-log")
        locks = pgcluster.make_dir(run_dir / "pgbackrest-lock")
        if self.verify_tls():
            host, tls = "localhost", f"repo1-storage-ca-file={self.ctx.cert}"
        else:
            host, tls = "127.0.0.1", "repo1-storage-verify-tls=n"
        lines = [
            "[global]",
            "repo1-type=azure",
            f"repo1-azure-account={ACCOUNT}",
            f"repo1-azure-key={KEY}",
            f"repo1-azure-container={container}",
            f"repo1-azure-endpoint={host}",
            f"repo1-storage-host={host}",
            f"repo1-storage-port={self.ctx.azurite.port}",
            "repo1-azure-uri-style=path",
            tls,
            "repo1-path=/repo",
            "repo1-retention-full=1",
            "compress-type=zst",
            f"compress-level={LEVEL}",
            f"archive-async={'y' if self.archive_async else 'n'}",
            "process-max=2",
            "archive-get-queue-max=2GiB",
            f"spool-path={spool}",
            f"log-path={logs}",
            f"lock-path={locks}",
            "log-level-console=warn",
            "log-level-stderr=warn",
            "log-level-file=info",
            "",
            f"[{STANZA}]",
            f"pg1-path={data}",
            f"pg1-socket-path={sockdir}",
            "pg1-port=5432",
            "pg1-user=postgres",
            "",
        ]
        path = self.config_path(run_dir)
        path.write_text("\n".join(lines))
        pgcluster.chown_tree(path)
        path.chmod(0o640)
        return path

    def base(self, run_dir: Path) -> str:
        return (f"{shlex.quote(self.ctx.pgbackrest)} "
                f"--config={shlex.quote(str(self.config_path(run_dir)))} --stanza={STANZA}")

    def prepare(self, container, run_dir, data, sockdir) -> None:
        self.write_config(container, run_dir, data, sockdir)
        pgcluster.run_pg(["sh", "-c", f"{self.base(run_dir)} stanza-create"])

    def archive_command(self, container, run_dir, data, sockdir) -> str:
        return f"{self.base(run_dir)} archive-push %p"

    def restore_command(self, container, run_dir, data) -> str:
        # PostgreSQL runs restore_command in the data directory, the same as pg1-path here.
        self.write_config(container, run_dir, data, data.parent / "nosocket")
        return f'{self.base(run_dir)} archive-get %f "%p"'

    def version(self) -> str:
        out = subprocess.run([self.ctx.pgbackrest, "version"], capture_output=True, text=True)
        return out.stdout.strip().replace("pgBackRest ", "")


class PgBackRestSync(PgBackRest):
    key, label = "pgbackrest-sync", "pgBackRest (no async)"
    archive_async = False


class Barman(Tool):
    key, label = "barman", "barman-cloud"

    def url(self, container: str) -> str:
        return f"{self.ctx.azurite.endpoint}/{container}"

    def env(self, container: str, home: Path) -> dict[str, str]:
        env = super().env(container, home)
        env.update(AZURE_STORAGE_CONNECTION_STRING=self.ctx.azurite.connection_string,
                   REQUESTS_CA_BUNDLE=str(self.ctx.cert), SSL_CERT_FILE=str(self.ctx.cert))
        return env

    def archive_command(self, container, run_dir, data, sockdir) -> str:
        return " ".join(map(shlex.quote, [
            str(self.ctx.barman_bin / "barman-cloud-wal-archive"), "--cloud-provider",
            "azure-blob-storage", "--zstd", "--compression-level", str(LEVEL),
            self.url(container), BARMAN_SERVER])) + " %p"

    def restore_command(self, container, run_dir, data) -> str:
        return " ".join(map(shlex.quote, [
            str(self.ctx.barman_bin / "barman-cloud-wal-restore"), "--cloud-provider",
            "azure-blob-storage", self.url(container), BARMAN_SERVER])) + " %f %p"

    def version(self) -> str:
        out = subprocess.run([str(self.ctx.barman_bin / "barman-cloud-wal-archive"),
                              "--version"], capture_output=True, text=True)
        return (out.stdout + out.stderr).strip().replace("barman-cloud-wal-archive ", "")


class BarmanParallel(Barman):
    """barman-cloud-wal-restore with its own read-ahead: each call also downloads the next
    segments, in parallel threads, into a spool directory that later calls take from."""

    key, label = "barman-parallel", "barman-cloud (restore --parallel 3)"
    archive_key = "barman"
    parallel = 3

    def restore_command(self, container, run_dir, data) -> str:
        spool = pgcluster.make_dir(run_dir / "barman-spool")
        return " ".join(map(shlex.quote, [
            str(self.ctx.barman_bin / "barman-cloud-wal-restore"), "--cloud-provider",
            "azure-blob-storage", "--parallel", str(self.parallel), "--spool-dir", str(spool),
            self.url(container), BARMAN_SERVER])) + " %f %p"
