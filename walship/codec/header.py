"""The self-describing frame header at the start of every stored object.

Layout (all integers unsigned, big-endian)::

    magic      4 bytes   b"WSHP"
    version    1 byte    1
    count      1 byte    number of stages
    stages     count     stage ids, in the order they were applied when encoding
    -- only when stage 2 (AES-256-GCM) is present:
    key id     8 bytes   which master key (see walship.codec.keys)
    salt      16 bytes   per-object salt of the derived object key
    chunk      1 byte    log2 of the plaintext chunk size of the encryption stage

Stage ids: 1 = zstd, 2 = AES-256-GCM chunked stream. The header is authenticated: it is part of
the associated data of every encrypted chunk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from walship.errors import IntegrityError

MAGIC = b"WSHP"
VERSION = 1
ZSTD = 1
AES_256_GCM = 2
KNOWN_STAGES = (ZSTD, AES_256_GCM)
KEY_ID_BYTES = 8
SALT_BYTES = 16
_FIXED = struct.Struct(">4sBB")
_CRYPTO = struct.Struct(f">{KEY_ID_BYTES}s{SALT_BYTES}sB")


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Header:
    """The decoded header of an object."""

    stages: tuple[int, ...]
    key_id: bytes = b""
    salt: bytes = b""
    chunk_log2: int = 0

    @property
    def encrypted(self) -> bool:
        return AES_256_GCM in self.stages

    def encode(self) -> bytes:
        data = _FIXED.pack(MAGIC, VERSION, len(self.stages)) + bytes(self.stages)
        if self.encrypted:
            data += _CRYPTO.pack(self.key_id, self.salt, self.chunk_log2)
        return data

    @classmethod
    def read(cls, source: Readable, name: str) -> Header:
        """Read and check a header from the start of ``source``."""
        fixed = _read_exactly(source, _FIXED.size, name)
        magic, version, count = _FIXED.unpack(fixed)
        if magic != MAGIC:
            raise IntegrityError(f"object {name} is not a walship object", "bad magic bytes",
                                 "is the repository shared with another tool?")
        if version != VERSION:
            raise IntegrityError(f"object {name} has format version {version}", "this walship "
                                 f"reads version {VERSION}", "upgrade walship")
        stages = tuple(_read_exactly(source, count, name))
        if (any(s not in KNOWN_STAGES for s in stages) or len(set(stages)) != len(stages)
                or (AES_256_GCM in stages and stages[-1] != AES_256_GCM)):
            raise IntegrityError(f"object {name} has an invalid stage list {list(stages)}")
        if AES_256_GCM not in stages:
            return cls(stages)
        key_id, salt, chunk_log2 = _CRYPTO.unpack(_read_exactly(source, _CRYPTO.size, name))
        if not 10 <= chunk_log2 <= 24:
            raise IntegrityError(f"object {name} has an invalid chunk size 2^{chunk_log2}")
        return cls(stages, key_id, salt, chunk_log2)


def _read_exactly(source: Readable, n: int, name: str) -> bytes:
    data = b""
    while len(data) < n:
        chunk = source.read(n - len(data))
        if not chunk:
            raise IntegrityError(f"object {name} is truncated", "it ends inside its header")
        data += chunk
    return data
