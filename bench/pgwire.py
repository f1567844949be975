"""A minimal PostgreSQL client (protocol 3, Unix socket, trust authentication, simple queries).

The harness polls a server every 50 ms while it archives or recovers; one persistent connection
costs next to nothing, where a psql process per poll would compete for the machine's two cores
with the tools being measured. Standard library only, so it runs in any venv.
"""

from __future__ import annotations

import socket
import struct


class PgError(Exception):
    """An error reported by the server (or a closed connection)."""


class Connection:
    def __init__(self, socket_dir: str, port: int = 5432, user: str = "postgres",
                 database: str = "postgres", timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(f"{socket_dir}/.s.PGSQL.{port}")
            params = (f"user\0{user}\0database\0{database}\0"
                      "application_name\0walship-bench\0\0").encode()
            self.sock.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
            while True:
                kind, body = self._read()
                if kind == b"R":
                    if struct.unpack("!I", body[:4])[0] != 0:
                        raise PgError("the server asks for a password; the harness uses trust")
                elif kind == b"E":
                    raise PgError(_error_text(body))
                elif kind == b"Z":
                    break
        except BaseException:
            self.sock.close()
            raise

    def _recv_exact(self, size: int) -> bytes:
        chunks, left = [], size
        while left:
            chunk = self.sock.recv(left)
            if not chunk:
                raise PgError("connection closed by the server")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _read(self) -> tuple[bytes, bytes]:
        header = self._recv_exact(5)
        length = struct.unpack("!I", header[1:])[0]
        return header[:1], self._recv_exact(length - 4)

    def query(self, sql: str) -> list[tuple[str | None, ...]]:
        """Run ``sql`` (simple query protocol); the rows as text, None for NULL."""
        payload = sql.encode() + b"\0"
        self.sock.sendall(b"Q" + struct.pack("!I", 4 + len(payload)) + payload)
        rows: list[tuple[str | None, ...]] = []
        error = None
        while True:
            kind, body = self._read()
            if kind == b"D":
                count = struct.unpack("!H", body[:2])[0]
                pos, row = 2, []
                for _ in range(count):
                    size = struct.unpack("!i", body[pos:pos + 4])[0]
                    pos += 4
                    if size < 0:
                        row.append(None)
                    else:
                        row.append(body[pos:pos + size].decode())
                        pos += size
                rows.append(tuple(row))
            elif kind == b"E":
                error = _error_text(body)
            elif kind == b"Z":
                break
        if error:
            raise PgError(error)
        return rows

    def value(self, sql: str) -> str | None:
        rows = self.query(sql)
        return rows[0][0] if rows else None

    def close(self) -> None:
        try:
            self.sock.sendall(b"X" + struct.pack("!I", 4))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _error_text(body: bytes) -> str:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[part[:1]] = part[1:].decode(errors="replace")
    return fields.get(b"M", "unknown error")
