"""PostgreSQL-level proof that a standby survives a storage outage.

In a standby (``standby.signal``) PostgreSQL never ends recovery on "not found": it streams, or
waits and asks the archive again. So there walship answers an unreachable or missing repository
with 1, "not available yet", instead of the 132 that makes the startup process FATAL and shuts
the standby down. Two standbys of one primary lose their repository for OUTAGE_SECONDS: one fed
by the archive alone keeps running and answering queries, and resumes archive replay once the
repository is back; one started during the outage with ``primary_conninfo`` comes up by
streaming and keeps streaming. The outage is a ``file://`` repository's directory renamed away
(an unmounted share: the primary cannot archive meanwhile either), or the standbys' network
path to Azure (Azurite behind a proxy) refusing connections, live ones cut. (The issue speaks of
a minute; 25 s keep CI fast and span several of PostgreSQL's 5 s retries.) Point-in-time
recovery without ``standby.signal`` still aborts when the repository is gone:
``test_recovery_failures.test_unreachable_repository_aborts_recovery``.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytestmark = [pytest.mark.e2e]

OUTAGE_SECONDS = 25


class Proxy:
    """A TCP proxy on 127.0.0.1 to ``target``; ``down()`` closes its port and cuts every
    connection (an outage: connections are refused), ``up()`` opens the same port again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.listener = self._listen(0)
        self.port = self.listener.getsockname()[1]

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return listener

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: the outage began
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, server]
            threading.Thread(target=self._request, args=(client, server), daemon=True).start()
            threading.Thread(target=self._reply, args=(server, client), daemon=True).start()

    def _request(self, client: socket.socket, server: socket.socket) -> None:
        """Client to server (a subclass may watch or change the bytes)."""
        self._pump(client, server)

    def _reply(self, server: socket.socket, client: socket.socket) -> None:
        """Server to client (a subclass may watch or change the bytes)."""
        self._pump(server, client)

    @classmethod
    def _pump(cls, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        cls._shut(source, sink)

    @staticmethod
    def _shut(*sockets: socket.socket) -> None:
        """Shut both ways down (the other direction's pump then ends too)."""
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def down(self) -> None:
        try:  # (close alone leaves a socket listening while a thread waits in accept)
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def up(self) -> None:
        self.listener = self._listen(self.port)


class Outage:
    """The standbys' repository (their environment ``env``), and a way to lose it."""

    def __init__(self, where: str, request) -> None:
        if where == "file":
            self.repository = request.getfixturevalue("file_repository")
            self.env = self.repository.env
            self.away = self.repository.path.with_name("repo.away")
            self.proxy = None
        else:
            self.repository = request.getfixturevalue("azure_repository")
            azurite = self.repository.azurite
            self.proxy = Proxy((azurite.host, azurite.port))
            request.addfinalizer(self.proxy.down)
            endpoint = f"http://127.0.0.1:{self.proxy.port}/{azurite.account}"
            # (one retry: every layer of a call during the outage spends the retry budget)
            self.env = dict(self.repository.env, WALSHIP_STORAGE_RETRIES="1",
                            AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string.replace(
                                azurite.blob_endpoint, endpoint))

    def begin(self) -> None:
        if self.proxy is None:
            self.repository.path.rename(self.away)
        else:
            self.proxy.down()

    def end(self) -> None:
        if self.proxy is None:
            self.away.rename(self.repository.path)
        else:
            self.proxy.up()


def marker(cluster) -> int:
    """The largest value in table ``marker`` as the server sees it (-1: no answer)."""
    answer = cluster.try_psql("SELECT coalesce(max(x), 0) FROM marker")
    return int(answer) if answer else -1


def hold(seconds: float, archived, streamed=None) -> None:
    """For ``seconds``: the standbys stay up; the one fed by the archive alone answers queries
    (hot standby) with what it had replayed, the other streams."""
    until = time.monotonic() + seconds
    while True:
        assert archived.is_running(), archived.log_tail()
        assert marker(archived) == 1, archived.log_tail()
        if streamed is not None:
            assert streamed.is_running(), streamed.log_tail()
            assert streamed.try_psql("SELECT status FROM pg_stat_wal_receiver") \
                == "streaming", streamed.log_tail()
        if time.monotonic() > until:
            return
        time.sleep(1)


def write_marker(primary, value: int) -> str:
    """Insert ``value`` on the primary and switch WAL; the name of the segment completed."""
    primary.psql(f"INSERT INTO marker VALUES ({value})")
    return primary.switch_wal()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["file", "azure"])
def test_standby_survives_a_repository_outage(pg, request, where):
    outage = Outage(where, request)
    # The primary archives straight into the repository (file: it fails during the outage).
    # (wal_keep_size: the primary keeps the WAL a standby started during the outage streams)
    primary = pg.initdb("primary", env=outage.repository.env, wal_keep_size="256MB")
    primary.start()
    primary.pgbench_init(1)
    primary.psql("CREATE TABLE marker (x int)")
    backup = pg.basebackup(primary)
    primary.wait_archived(write_marker(primary, 1))

    archived = pg.restore(backup, "archived", env=outage.env, standby=True)  # the archive alone
    archived.start()
    pg.wait_for(lambda: marker(archived) == 1, 90, "the standby to replay the archive",
                archived)
    replayed_before = archived.psql("SELECT pg_last_wal_replay_lsn()")

    outage.begin()
    outage_began = time.monotonic()
    try:
        last = write_marker(primary, 2)
        hold(8, archived)  # PostgreSQL asks the archive again every 5 s
        # Started during the outage: it finds no archive and streams from the primary.
        streamed = pg.restore(backup, "streamed", env=outage.env, standby=True,
                              primary_conninfo=f"host={primary.sockdir} user=postgres")
        streamed.start()
        pg.wait_for(lambda: marker(streamed) == 2, 90, "the standby to stream", streamed)
        hold(OUTAGE_SECONDS - (time.monotonic() - outage_began), archived, streamed)
        write_marker(primary, 3)
        pg.wait_for(lambda: marker(streamed) == 3, 60, "the standby to keep streaming",
                    streamed)
        assert marker(archived) == 1, archived.log_tail()
    finally:
        outage.end()

    primary.wait_archived(write_marker(primary, 4), timeout=120)  # (wakes the archiver)
    assert primary.is_archived(last)
    pg.wait_for(lambda: marker(archived) == 4, 90,
                "the standby to resume archive replay once the repository is back", archived)
    assert archived.psql(f"SELECT pg_last_wal_replay_lsn() > '{replayed_before}'") == "t"
    for standby in (archived, streamed):
        assert standby.is_running() and standby.in_recovery(), standby.log_tail()
        log = standby.log_text()
        assert "could not restore file" not in log, standby.log_tail()  # no FATAL from it
        assert "startup process" not in log, standby.log_tail()  # (exited, terminated)
        # It said why, loudly, in PostgreSQL's log: one WARNING line per call.
        assert "walship: wal-fetch " in log and ": WARNING: " in log, standby.log_tail()
        assert "standby.signal" in log and "ERROR" not in log, standby.log_tail()
    assert marker(streamed) == 4
