"""One Azurite (Azure Blob emulator) over HTTPS on 127.0.0.1 for the whole benchmark run, and
the few blob operations the harness needs (create a container, sum its blob sizes, delete it).

The certificate is self-signed; every client is given it as its trust anchor (REQUESTS_CA_BUNDLE
or ``connection_verify``) so TLS verification stays on.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, documented by Microsoft).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

CANDIDATES = [
    "/opt/walship-azurite/node_modules/.bin/azurite-blob",
    "/opt/azurite/node_modules/.bin/azurite-blob",
]


def find_binary(explicit: str | None = None) -> str:
    for candidate in [explicit, os.environ.get("WALSHIP_AZURITE_BIN"), *CANDIDATES,
                      shutil.which("azurite-blob")]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit("azurite-blob not found: run bench/setup.sh or set WALSHIP_AZURITE_BIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Azurite:
    def __init__(self, binary: str, location: Path, cert: Path, key: Path) -> None:
        self.binary, self.location, self.cert, self.key = binary, location, cert, key
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = location.parent / "azurite.log"

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={KEY};"
                f"BlobEndpoint={self.endpoint};")

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True)
        return out.stdout.strip() or "?"

    def start(self) -> None:
        self.location.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                 "--location", str(self.location), "--cert", str(self.cert),
                 "--key", str(self.key), "--loose", "--skipApiVersionCheck", "--silent"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        context = ssl.create_default_context(cafile=str(self.cert))
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Azurite exited {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as raw:
                    with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                        return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("Azurite did not start listening in 60 s")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: only what we started
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.proc = None

    # -- blobs ---------------------------------------------------------------------------------
    def _service(self):
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(
            self.connection_string, connection_verify=str(self.cert))

    def create_container(self, name: str) -> None:
        from azure.core.exceptions import ResourceExistsError

        try:
            self._service().create_container(name)
        except ResourceExistsError:
            pass

    def delete_container(self, name: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            self._service().delete_container(name)
        except ResourceNotFoundError:
            pass

    def container_usage(self, name: str) -> tuple[int, int]:
        """(number of blobs, sum of their sizes in bytes)."""
        client = self._service().get_container_client(name)
        count = total = 0
        for blob in client.list_blobs():
            count += 1
            total += blob.size
        return count, total
