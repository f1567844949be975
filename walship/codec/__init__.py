"""The codec: how plaintext becomes a stored object and back, as an ordered list of stages.

Encoding applies zstd, then (when a key is configured) AES-256-GCM, behind the self-describing
header of :mod:`walship.codec.header`; decoding reads the header and undoes the stages in
reverse, so no listing or side channel is ever needed to decode an object. Both directions
stream in bounded memory.

Every object also has an *object digest* in its metadata (``walship_sha256``): the SHA-256 of a
domain tag, the object's name and the stored bytes (header included), computed as they are
stored (:class:`StoredForm`). Decoding checks it over every byte it reads, so an object that was
truncated, corrupted or swapped for another is rejected even where zstd alone would not notice
(a zstd stream cut at a block boundary decodes "successfully"). It hashes the compressed bytes,
a fraction of the plaintext, and needs no key, so ``wal-verify --deep`` can check an encrypted
archive's integrity without it. An encrypted object is authenticated by its AEAD tags besides:
the header and the name are associated data of every chunk.

Objects written before walship had the object digest carry a *plaintext digest* instead
(``walship_digest``: SHA-256, or HMAC-SHA256 under the key's digest key, of a domain tag, the
name and the plaintext); decoding still checks it when it is the only one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from walship.codec.header import AES_256_GCM, SALT_BYTES, ZSTD, Header, Readable
from walship.codec.keys import EncryptionKey
from walship.errors import IntegrityError, KeyMismatch

DEFAULT_LEVEL = 1
# zstd parameters walship changes from a level's defaults. Level 1 (the default) looks for
# matches of 5 bytes instead of 7: on pgbench WAL this stores 1-2% less than zstd's own level 3
# (and than pgBackRest's zst level 3) in two thirds of level 3's time, and decodes as fast
# (measured with bench/codec_levels.py; see docs/benchmarks.md).
TUNED_PARAMETERS: dict[int, dict[str, int]] = {1: {"min_match": 5}}
DEFAULT_CHUNK_LOG2 = 18  # 256 KiB encryption chunks
OBJECT_DIGEST_METADATA = "walship_sha256"
DIGEST_METADATA = "walship_digest"  # the plaintext digest of older objects
_DOMAIN = b"walship v1 object\x00"
_OBJECT_DOMAIN = b"walship v1 stored\x00"
_OUT_SIZE = 1 << 20


@dataclass(frozen=True)
class Codec:
    """Compression level, optional key and chunk size: everything needed to encode or decode."""

    level: int = DEFAULT_LEVEL
    key: EncryptionKey | None = None
    chunk_log2: int = DEFAULT_CHUNK_LOG2

    # -- digests ---------------------------------------------------------------------------------
    def digester(self, name: str) -> PlaintextDigest:
        """A fresh plaintext digest for the object ``name`` (the older objects' kind)."""
        return PlaintextDigest(self.key, name)

    def stored_form(self, name: str, chunks: Iterable[bytes], *, size_hint: int | None = None,
                    salt: bytes | None = None) -> StoredForm:
        """The stored form of the plaintext ``chunks``, to hand to ``Storage.put`` with its
        ``metadata`` (see :class:`StoredForm`)."""
        return StoredForm(name, self.encode(name, chunks, size_hint=size_hint, salt=salt))

    # -- encoding --------------------------------------------------------------------------------
    def encode(self, name: str, chunks: Iterable[bytes], *, size_hint: int | None = None,
               salt: bytes | None = None) -> Iterator[bytes]:
        """Yield the stored form of the plaintext ``chunks`` for the object ``name``."""
        import zstandard

        stages = (ZSTD, AES_256_GCM) if self.key else (ZSTD,)
        header = Header(stages)
        encryptor = None
        if self.key:
            header = Header(stages, self.key.key_id, salt or os.urandom(SALT_BYTES),
                            self.chunk_log2)
        head = header.encode()
        if self.key:
            from walship.codec.aead import Encryptor

            encryptor = Encryptor(self.key.object_key(header.salt), head + name.encode(),
                                  1 << self.chunk_log2)
        params = zstandard.ZstdCompressionParameters.from_level(
            self.level, write_checksum=1, **TUNED_PARAMETERS.get(self.level, {}))
        compressor = zstandard.ZstdCompressor(compression_params=params)
        zobj = compressor.compressobj(size=size_hint if size_hint is not None else -1)
        yield head
        for chunk in chunks:
            out = zobj.compress(chunk)
            if encryptor and out:
                out = encryptor.update(out)
            if out:
                yield out
        out = zobj.flush()
        if encryptor:
            out = encryptor.update(out) + encryptor.finish()
        yield out

    # -- decoding --------------------------------------------------------------------------------
    def decode(self, name: str, source: Readable, metadata: Mapping[str, str]
               ) -> Iterator[bytes]:
        """Yield the plaintext of the stored object ``name`` read from ``source``.

        ``metadata`` is the object's; its digest is checked once every byte has been read,
        before the generator finishes, so a consumer must treat the data as unverified until
        the iteration ends without an exception.
        """
        import zstandard

        object_digest = metadata.get(OBJECT_DIGEST_METADATA)
        hashing = None
        if object_digest is not None:
            hashing = _HashingReader(source, ObjectDigest(name))
            source = hashing
        header = Header.read(source, name)
        reader: Readable = source
        if self.key is not None and not header.encrypted:
            raise KeyMismatch(f"object {name} is not encrypted", "an encryption key is "
                              "configured, so only objects it authenticates are accepted",
                              "use a repository written with this key, or unset the key")
        if header.encrypted:
            if self.key is None:
                raise KeyMismatch(f"object {name} is encrypted", "no encryption key is "
                                  "configured", "set WALSHIP_ENCRYPTION_KEY_FILE")
            if header.key_id != self.key.key_id:
                raise KeyMismatch(f"object {name} was encrypted with another key",
                                  f"its key id is {header.key_id.hex()}, the configured key's "
                                  f"is {self.key.key_id.hex()}", "configure the key the "
                                  "archive was written with")
            from walship.codec.aead import DecryptingReader

            reader = DecryptingReader(source, self.key.object_key(header.salt),
                                      header.encode() + name.encode(), 1 << header.chunk_log2,
                                      name)
        check = None  # the plaintext digest, for an unencrypted object with nothing else
        if hashing is None and not header.encrypted:
            digest = metadata.get(DIGEST_METADATA)
            check = self.digester(name)
            if digest is None or not check.compatible(digest):
                raise KeyMismatch(f"object {name} cannot be verified",
                                  "its metadata has no digest made with the configured key"
                                  if digest else "its metadata has no digest",
                                  "configure the key the archive was written with")
        try:
            plain = zstandard.ZstdDecompressor().stream_reader(
                reader, read_size=1 << 17, read_across_frames=False, closefd=False)
            while chunk := plain.read(_OUT_SIZE):
                if check is not None:
                    check.update(chunk)
                yield chunk
            if reader.read(1):
                raise IntegrityError(f"object {name} is damaged", "data follows its end")
        except zstandard.ZstdError as error:
            raise IntegrityError(f"object {name} is damaged", f"zstd: {error}",
                                 "the stored object is corrupt") from None
        if hashing is not None:
            if hashing.read(1):  # (the digest covers every byte of the object)
                raise IntegrityError(f"object {name} is damaged", "data follows its end")
            intact = hmac.compare_digest(hashing.digest.hexdigest(), object_digest or "")
        else:
            intact = check is None or hmac.compare_digest(
                check.hexdigest(), metadata.get(DIGEST_METADATA) or "")
        if not intact:
            raise IntegrityError(f"object {name} is damaged", "its content does not match its "
                                 "digest (truncated, corrupted or swapped)",
                                 "the stored object is corrupt")


class StoredForm:
    """The stored bytes of one object, as an iterable for ``Storage.put``; once it has been
    iterated, ``size`` is their number and :meth:`metadata` the object's metadata (its object
    digest), which ``put`` asks for only after the data."""

    def __init__(self, name: str, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self._digest = ObjectDigest(name)
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self._digest.update(chunk)
            self.size += len(chunk)
            yield chunk

    def metadata(self) -> dict[str, str]:
        return {OBJECT_DIGEST_METADATA: self._digest.hexdigest()}


class ObjectDigest:
    """SHA-256 of the domain tag, the name and the stored bytes, as ``sha256:<hex>``."""

    def __init__(self, name: str) -> None:
        self._hash = hashlib.sha256(_OBJECT_DOMAIN + name.encode() + b"\x00")

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class _HashingReader:
    """Passes reads through, hashing every byte."""

    def __init__(self, source: Readable, digest: ObjectDigest) -> None:
        self._source = source
        self.digest = digest

    def read(self, n: int = -1, /) -> bytes:
        data = self._source.read(n)
        self.digest.update(data)
        return data


class PlaintextDigest:
    """SHA-256, or HMAC-SHA256 with a key, of the domain tag, the name and the plaintext (the
    digest of objects written before the object digest; still checked when it is the only one).

    Rendered as ``sha256:<hex>`` or ``hmac-sha256:<key id>:<hex>``.
    """

    def __init__(self, key: EncryptionKey | None, name: str) -> None:
        prefix = _DOMAIN + name.encode() + b"\x00"
        if key is None:
            self._hash = hashlib.sha256(prefix)
            self._label = "sha256:"
        else:
            self._hash = hmac.new(key.digest_key, prefix, hashlib.sha256)
            self._label = f"hmac-sha256:{key.key_id.hex()}:"

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._label + self._hash.hexdigest()

    def compatible(self, digest: str) -> bool:
        """Whether ``digest`` was made the same way (same algorithm and key) as this one."""
        return digest.startswith(self._label) and len(digest) == len(self._label) + 64
