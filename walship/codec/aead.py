"""The encryption stage: AES-256-GCM in a chunked, streaming, online-authenticated construction.

The plaintext is cut into chunks of ``2**chunk_log2`` bytes (the last one may be shorter, even
empty). Chunk *i* is sealed with AES-256-GCM under the object's derived key (see
:mod:`walship.codec.keys`), nonce ``i`` as 11 big-endian bytes followed by a final flag byte
(``1`` on the last chunk, ``0`` otherwise), and associated data = the object's header followed by
its name. Each sealed chunk is the ciphertext plus its 16-byte tag, laid end to end.

This is the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015): a modified, truncated
(at a chunk boundary or not), extended or reordered stream fails authentication, and so does an
object copied under another name, because the name is authenticated. Plaintext is released only
after its chunk has been authenticated.
"""

from __future__ import annotations

from walship.codec.header import Readable
from walship.errors import IntegrityError

TAG_BYTES = 16


def _nonce(counter: int, final: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def _aead(key: bytes):  # noqa: ANN202 - cryptography's AESGCM, imported lazily
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


class Encryptor:
    """Seals a plaintext stream fed in pieces of any size."""

    def __init__(self, key: bytes, associated_data: bytes, chunk_size: int) -> None:
        self._aead = _aead(key)
        self._ad = associated_data
        self._chunk = chunk_size
        self._buffer = bytearray()
        self._counter = 0

    def update(self, data: bytes) -> bytes:
        self._buffer += data
        out = []
        while len(self._buffer) > self._chunk:  # strictly more: the final chunk is held back
            out.append(self._seal(bytes(self._buffer[:self._chunk]), final=False))
            del self._buffer[:self._chunk]
        return b"".join(out)

    def finish(self) -> bytes:
        sealed = self._seal(bytes(self._buffer), final=True)
        self._buffer.clear()
        return sealed

    def _seal(self, chunk: bytes, final: bool) -> bytes:
        sealed = self._aead.encrypt(_nonce(self._counter, final), chunk, self._ad)
        self._counter += 1
        return sealed


class DecryptingReader:
    """A readable stream of authenticated plaintext over a readable stream of sealed chunks."""

    def __init__(self, source: Readable, key: bytes, associated_data: bytes, chunk_size: int,
                 name: str) -> None:
        self._source = source
        self._aead = _aead(key)
        self._ad = associated_data
        self._sealed_size = chunk_size + TAG_BYTES
        self._name = name
        self._pending = bytearray()  # sealed bytes read but not opened
        self._plain = b""  # opened bytes not yet returned
        self._counter = 0
        self._done = False

    def read(self, n: int = -1) -> bytes:
        while not self._plain and not self._done:
            self._open_next()
        if n is None or n < 0 or n >= len(self._plain):
            out, self._plain = self._plain, b""
        else:
            out, self._plain = self._plain[:n], self._plain[n:]
        return out

    def _open_next(self) -> None:
        # Read until we hold more than one sealed chunk (so the next is not the last) or EOF.
        eof = False
        while len(self._pending) <= self._sealed_size:
            data = self._source.read(self._sealed_size + 1 - len(self._pending))
            if not data:
                eof = True
                break
            self._pending += data
        if not eof:
            sealed = bytes(self._pending[:self._sealed_size])
            del self._pending[:self._sealed_size]
            self._plain = self._open(sealed, final=False)
        else:
            if len(self._pending) < TAG_BYTES:
                raise IntegrityError(f"object {self._name} is truncated",
                                     "its last encrypted chunk is missing",
                                     "the stored object is damaged")
            self._plain = self._open(bytes(self._pending), final=True)
            self._pending.clear()
            self._done = True

    def _open(self, sealed: bytes, final: bool) -> bytes:
        from cryptography.exceptions import InvalidTag

        try:
            plain = self._aead.decrypt(_nonce(self._counter, final), sealed, self._ad)
        except InvalidTag:
            raise IntegrityError(f"object {self._name} failed authentication",
                                 f"encrypted chunk {self._counter} was modified, truncated, "
                                 "reordered, or the object was stored under another name",
                                 "the stored object is damaged or tampered with") from None
        self._counter += 1
        return plain
