"""docs/format.md's test vector decodes to its plaintext with this code."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from walship.codec import DIGEST_METADATA, OBJECT_DIGEST_METADATA, Codec, ObjectDigest
from walship.codec.header import Header
from walship.codec.keys import EncryptionKey

DOC = (Path(__file__).parents[2] / "docs" / "format.md").read_text()
NAME = "wal/000000010000000000000001"
PLAINTEXT = b"walship test vector: " + bytes(2000) + b" end\n"
KEY = EncryptionKey.from_text(re.search(r"`(walship-key-v1:[^`]+)`", DOC)[1])


def vector(label: str) -> tuple[bytes, str, str]:
    """The stored bytes, the plaintext digest and the object digest of a vector."""
    match = re.search(rf"```{label}\n([0-9a-f]+)\n```\ndigest `([^`]+)`,\n"
                      r"object digest `([^`]+)`", DOC)
    assert match, f"no {label} vector in docs/format.md"
    return bytes.fromhex(match[1]), match[2], match[3]


@pytest.mark.parametrize("label,codec", [("plain", Codec()), ("encrypted", Codec(key=KEY))])
def test_vector_decodes(label, codec):
    stored, digest, object_digest = vector(label)
    for metadata in ({DIGEST_METADATA: digest}, {OBJECT_DIGEST_METADATA: object_digest}):
        assert b"".join(codec.decode(NAME, io.BytesIO(stored), metadata)) == PLAINTEXT
    check = codec.digester(NAME)
    check.update(PLAINTEXT)
    assert check.hexdigest() == digest
    ours = ObjectDigest(NAME)
    ours.update(stored)
    assert ours.hexdigest() == object_digest


def test_vector_header_is_what_the_encoder_writes():
    stored, _, _ = vector("encrypted")
    header = Header.read(io.BytesIO(stored), NAME)
    assert header.key_id.hex() == "d98fb47d52da3620" == KEY.key_id.hex()
    assert header.salt == bytes(range(16, 32)) and header.chunk_log2 == 10
    ours = b"".join(Codec(key=KEY, chunk_log2=10).encode(NAME, [PLAINTEXT],
                                                         salt=bytes(range(16, 32))))
    assert ours[:len(header.encode())] == header.encode()
