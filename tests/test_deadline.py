"""Every call is bounded in time and ends cleanly on SIGTERM (walship.deadline).

The storage here is a *black hole*: a socket on 127.0.0.1 that accepts connections and never
answers (as a storage account behind a broken load balancer or firewall does), named as the
Azure endpoint. Before the deadline existed, a wal-push against it returned after 165 s (495 s
with push-ahead), a wal-fetch after 225 s, and SIGTERM left a wal-fetch's temporary file behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.azurite import ACCOUNT, KEY
from walship.codec import Codec

SEGMENT = 1 << 20  # the smallest WAL segment size: quick to write
NAME = "000000010000000000000009"
NEXT = "00000001000000000000000A"


class BlackHole:
    """A listening socket that accepts every connection and never sends a byte; or, with
    ``reply``, sends that many bytes of an HTTP reply and then nothing more."""

    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)
            if self.reply:
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        request = b""
        try:
            while b"\r\n\r\n" not in request:
                data = conn.recv(65536)
                if not data:
                    return
                request += data
            conn.sendall(self.reply)
        except OSError:
            pass

    def env(self, **extra: str) -> dict[str, str]:
        """A walship environment whose repository is behind this socket."""
        return {
            "PATH": "/usr/bin:/bin", "HOME": "/", "LC_ALL": "C",
            "WALSHIP_CONFIG": os.devnull, "WALSHIP_REPO": "azure://wal/cluster",
            "AZURE_STORAGE_CONNECTION_STRING": (
                f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
                f"BlobEndpoint=http://127.0.0.1:{self.port}/{ACCOUNT};"),
            **extra,
        }

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


def _pg_wal(root: Path, names: list[str]) -> Path:
    """A pg_wal directory holding ``names`` as 1 MiB segments, each marked .ready."""
    wal = root / "pg_wal"
    (wal / "archive_status").mkdir(parents=True)
    for name in names:
        (wal / name).write_bytes(os.urandom(SEGMENT))
        (wal / "archive_status" / f"{name}.ready").touch()
    return wal


def _timed(args: list[str], env: dict[str, str], cwd: Path,
           limit: float) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=limit, check=False)
    return proc, time.monotonic() - started


def _stop_helpers(wal: Path) -> None:
    """A prefetch worker or background pusher a call started (pid in its lock file)."""
    for lock in (wal / "walship" / "prefetch" / "worker.lock", wal / "walship" / "pusher.lock"):
        try:
            pid = int(lock.read_text().split()[0])
            if b"walship" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["auto", "sdk"])
def test_wal_push_into_a_black_hole_fails_within_the_deadline(tmp_path, black_hole,
                                                               walship_bin, transport):
    """With push-ahead (three more files ready): the call's own upload fails at the deadline
    and the call returns at once, whatever the other uploads do (before: 495 s)."""
    names = [f"0000000100000000000000{n:02X}" for n in range(1, 5)]
    wal = _pg_wal(tmp_path, names)
    env = black_hole.env(WALSHIP_CALL_TIMEOUT="3", WALSHIP_AZURE_TRANSPORT=transport)
    try:
        proc, seconds = _timed([walship_bin, "wal-push", f"pg_wal/{names[0]}"], env, tmp_path,
                               60)
    finally:
        _stop_helpers(wal)
    assert proc.returncode == 4, proc.stderr
    assert 2.5 < seconds < 3 + 2.5, (seconds, proc.stderr)
    assert "call_timeout" in proc.stderr and "Traceback" not in proc.stderr
    assert black_hole.accepted  # it did try


@pytest.mark.timeout(120)
@pytest.mark.parametrize("prefetch", ["0", "8"])
def test_wal_fetch_from_a_black_hole_fails_within_the_deadline(tmp_path, black_hole,
                                                                walship_bin, prefetch):
    """Exit 132 (fatal to recovery, never "not found") by the deadline, with the prefetch
    worker running (it is asked first, and does not answer either) or without; no file left
    in pg_wal (before: 225 s)."""
    wal = _pg_wal(tmp_path, [])
    env = black_hole.env(WALSHIP_CALL_TIMEOUT="3", WALSHIP_PREFETCH=prefetch)
    try:
        proc, seconds = _timed([walship_bin, "wal-fetch", NAME, "pg_wal/RECOVERYXLOG"], env,
                               tmp_path, 60)
    finally:
        _stop_helpers(wal)
    assert proc.returncode == 132, proc.stderr
    assert seconds < 3 + 2.5, (seconds, proc.stderr)
    assert [p.name for p in wal.iterdir() if p.name != "walship"] == ["archive_status"]


def test_call_timeout_is_checked(monkeypatch):
    from walship.config import load_settings
    from walship.errors import ConfigError

    env = {"WALSHIP_CONFIG": os.devnull}
    assert load_settings(environ=env).call_timeout == 30.0
    assert load_settings(environ={**env, "WALSHIP_CALL_TIMEOUT": "2.5"}).call_timeout == 2.5
    for bad in ("nan", "inf", "-1", "0", "0.5", "7200", "soon"):
        with pytest.raises(ConfigError, match="call_timeout"):
            load_settings(environ={**env, "WALSHIP_CALL_TIMEOUT": bad})


def test_call_timeout_in_the_config_file_refuses_booleans(tmp_path):
    from walship.config import load_settings
    from walship.errors import ConfigError

    config = tmp_path / "walship.toml"
    config.write_text("call_timeout = true\n")
    with pytest.raises(ConfigError, match="call_timeout"):
        load_settings(environ={}, config_file=str(config))
    config.write_text("call_timeout = nan\n")
    with pytest.raises(ConfigError, match="call_timeout"):
        load_settings(environ={}, config_file=str(config))
    config.write_text("call_timeout = 12\n")
    assert load_settings(environ={}, config_file=str(config)).call_timeout == 12.0


def _stalling_reply(name: str) -> bytes:
    """An HTTP reply to a Get Blob of ``name``: the headers and half of a real object, then
    nothing (the connection stays open)."""
    data = os.urandom(SEGMENT)
    stored = Codec().stored_form(f"wal/{name}", iter([data]), size_hint=len(data))
    body = b"".join(stored)
    headers = [b"HTTP/1.1 200 OK", b"Content-Length: %d" % len(body),
               b"Content-Type: application/octet-stream", b'ETag: "0x1"',
               b"Last-Modified: Sun, 06 Dec 2026 04:00:00 GMT"]
    headers += [f"x-ms-meta-{k}: {v}".encode() for k, v in stored.metadata().items()]
    return b"\r\n".join(headers) + b"\r\n\r\n" + body[:len(body) // 2]


def _wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.timeout(60)
def test_sigterm_ends_a_wal_fetch_at_once_and_removes_its_temporary_file(tmp_path,
                                                                          walship_bin):
    """A download that stalls half-way (its temporary file in pg_wal): SIGTERM ends the call
    within a second, exit 143 (>= 126: fatal to recovery), no temporary file left."""
    hole = BlackHole(reply=_stalling_reply(NAME))
    wal = _pg_wal(tmp_path, [])
    env = hole.env(WALSHIP_CALL_TIMEOUT="60", WALSHIP_PREFETCH="0")
    proc = subprocess.Popen([walship_bin, "wal-fetch", NAME, "pg_wal/RECOVERYXLOG"], env=env,
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: any(".walship-" in p.name for p in wal.iterdir()), 20,
                  "the download's temporary file")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=10)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        hole.close()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert status == 143, stderr
    assert seconds < 1.5, seconds
    assert "SIGTERM" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in wal.iterdir()) == ["archive_status"]


@pytest.mark.timeout(60)
def test_sigterm_ends_a_wal_push_at_once(tmp_path, black_hole, walship_bin):
    """A wal-push waiting on the storage (with push-ahead uploads queued): exit 143 within
    a second of SIGTERM, which PostgreSQL's archiver takes as fatal, as it takes the signal."""
    names = [f"0000000100000000000000{n:02X}" for n in range(1, 5)]
    wal = _pg_wal(tmp_path, names)
    env = black_hole.env(WALSHIP_CALL_TIMEOUT="60")
    proc = subprocess.Popen([walship_bin, "wal-push", f"pg_wal/{names[0]}"], env=env,
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        # (the first request, the repository marker's read, already hangs: every upload waits
        # behind it)
        _wait_for(lambda: len(black_hole.accepted) >= 1, 20, "the requests to start")
        time.sleep(0.2)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=10)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _stop_helpers(wal)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert status == 143, stderr
    assert seconds < 1.5, seconds
    assert "SIGTERM" in stderr and "Traceback" not in stderr


def test_server_stopping_is_read_from_postmaster_pid(tmp_path):
    """PostgreSQL writes its state on the 8th line of postmaster.pid (the data directory is
    the archiver's working directory)."""
    from walship.deadline import server_stopping

    assert not server_stopping(str(tmp_path))  # no server
    pid = tmp_path / "postmaster.pid"
    lines = ["1234", str(tmp_path), "1733450000", "5432", "/tmp", "", "  5432001    32768"]
    pid.write_text("\n".join([*lines, "ready   ", ""]))
    assert not server_stopping(str(tmp_path))
    pid.write_text("\n".join([*lines, "stopping", ""]))
    assert server_stopping(str(tmp_path))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["wal-push", "wal-fetch"])
def test_the_alarm_ends_a_call_blocked_outside_the_storage(tmp_path, walship_bin, call):
    """A wait no storage timeout covers, as on a hung mount (here: a FIFO with no writer where
    a file:// repository holds an object, whose opening blocks; WAL files that are FIFOs are
    refused at once): the backstop alarm ends the call 2 s after its deadline, exit 4, 132 in
    restore_command (before: it never returned)."""
    repo = tmp_path / "repo"
    (repo / "wal").mkdir(parents=True)
    if call == "wal-push":  # the repository's marker, read before the first push
        wal = _pg_wal(tmp_path, [NAME, NEXT])
        os.mkfifo(repo / "walship.json")
        argv, expected = [walship_bin, "wal-push", f"pg_wal/{NAME}"], 4
    else:
        wal = _pg_wal(tmp_path, [])
        os.mkfifo(repo / "wal" / NAME)
        argv, expected = [walship_bin, "wal-fetch", NAME, "pg_wal/RECOVERYXLOG"], 132
    env = {"PATH": "/usr/bin:/bin", "HOME": "/", "LC_ALL": "C", "WALSHIP_CONFIG": os.devnull,
           "WALSHIP_REPO": f"file://{repo}", "WALSHIP_CALL_TIMEOUT": "1",
           "WALSHIP_PUSH_AHEAD": "8", "WALSHIP_PREFETCH": "0"}
    try:
        proc, seconds = _timed(argv, env, tmp_path, 30)
    finally:
        _stop_helpers(wal)
    assert proc.returncode == expected, proc.stderr
    assert seconds < 1 + 2 + 1.5, seconds
    assert "deadline" in proc.stderr and "Traceback" not in proc.stderr
