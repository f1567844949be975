"""The codec round-trips, and rejects every kind of damage: flip, truncate, reorder, swap."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from walship.codec import DIGEST_METADATA, OBJECT_DIGEST_METADATA, Codec
from walship.codec.aead import TAG_BYTES
from walship.codec.header import Header
from walship.codec.keys import EncryptionKey
from walship.errors import ConfigError, IntegrityError, KeyMismatch

KEY = EncryptionKey(bytes(range(32)))
OTHER_KEY = EncryptionKey(bytes(32))


def encode(codec: Codec, name: str, data: bytes, step: int = 100_000
           ) -> tuple[bytes, dict[str, str]]:
    """The stored bytes and the metadata, as a put would store them."""
    chunks = [data[i:i + step] for i in range(0, len(data), step)]
    form = codec.stored_form(name, chunks, size_hint=len(data))
    stored = b"".join(form)
    assert form.size == len(stored)
    return stored, form.metadata()


def legacy(codec: Codec, name: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    """An object as walship stored them before object digests: the plaintext digest only."""
    digest = codec.digester(name)
    digest.update(data)
    return b"".join(codec.encode(name, [data])), {DIGEST_METADATA: digest.hexdigest()}


def decode(codec: Codec, name: str, stored: bytes, metadata: dict[str, str]) -> bytes:
    return b"".join(codec.decode(name, io.BytesIO(stored), metadata))


CODECS = {
    "plain": Codec(),
    "encrypted": Codec(key=KEY),
    "encrypted-small-chunks": Codec(key=KEY, chunk_log2=10),
}


@pytest.fixture(params=list(CODECS))
def codec(request):
    return CODECS[request.param]


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 300_000, 2_000_000])
def test_round_trip(codec, size):
    data = os.urandom(size // 2) + bytes(size - size // 2)
    stored, digest = encode(codec, "wal/x", data)
    assert decode(codec, "wal/x", stored, digest) == data


def test_compresses_wal_like_data():
    data = bytes(8 << 20) + os.urandom(1 << 20)
    stored, _ = encode(Codec(), "wal/x", data)
    assert len(stored) < 1.2 * (1 << 20)


def test_header_is_self_describing(codec):
    stored, _ = encode(codec, "wal/x", b"hello")
    header = Header.read(io.BytesIO(stored), "wal/x")
    assert header.encrypted == (codec.key is not None)
    if codec.key:
        assert header.key_id == codec.key.key_id and len(header.salt) == 16


def test_every_flipped_byte_is_detected(codec):
    data = os.urandom(5000) + bytes(20000)
    stored, digest = encode(codec, "wal/x", data)
    positions = sorted(set(range(0, len(stored), max(1, len(stored) // 97))) | {len(stored) - 1})
    for pos in positions:
        damaged = bytearray(stored)
        damaged[pos] ^= 0x01
        with pytest.raises(IntegrityError):
            decode(codec, "wal/x", bytes(damaged), digest)


def test_truncation_is_always_detected(codec):
    data = os.urandom(3000) + bytes(40000) + os.urandom(3000)
    stored, metadata = encode(codec, "wal/x", data)
    for cut in range(len(stored)):
        with pytest.raises(IntegrityError):
            decode(codec, "wal/x", stored[:cut], metadata)


def test_appended_data_is_detected(codec):
    stored, digest = encode(codec, "wal/x", os.urandom(5000))
    with pytest.raises(IntegrityError):
        decode(codec, "wal/x", stored + b"\x00", digest)


def test_reordered_chunks_are_detected():
    codec = Codec(key=KEY, chunk_log2=10)
    data = os.urandom(10_000)  # incompressible: about ten 1 KiB chunks
    stored, digest = encode(codec, "wal/x", data)
    head_len = len(Header.read(io.BytesIO(stored), "wal/x").encode())
    sealed = 1024 + TAG_BYTES
    body = stored[head_len:]
    chunks = [body[i:i + sealed] for i in range(0, len(body), sealed)]
    assert len(chunks) > 3
    swapped = chunks[:1] + [chunks[2], chunks[1]] + chunks[3:]
    with pytest.raises(IntegrityError, match="authentication"):
        decode(codec, "wal/x", stored[:head_len] + b"".join(swapped), digest)
    dropped = chunks[:-2] + chunks[-1:]
    with pytest.raises(IntegrityError):
        decode(codec, "wal/x", stored[:head_len] + b"".join(dropped), digest)
    cut_at_boundary = chunks[:-1]
    with pytest.raises(IntegrityError):
        decode(codec, "wal/x", stored[:head_len] + b"".join(cut_at_boundary), digest)


def test_swapped_objects_are_detected(codec):
    a, digest_a = encode(codec, "wal/a", os.urandom(4000))
    b, digest_b = encode(codec, "wal/b", os.urandom(4000))
    # An object (with its metadata) stored under another name fails, encrypted or not.
    with pytest.raises(IntegrityError):
        decode(codec, "wal/a", b, digest_b)
    with pytest.raises(IntegrityError):
        decode(codec, "wal/a", b, digest_a)


def test_wrong_key_is_reported_as_such():
    stored, digest = encode(Codec(key=KEY), "wal/x", b"secret")
    with pytest.raises(KeyMismatch, match="another key"):
        decode(Codec(key=OTHER_KEY), "wal/x", stored, digest)
    with pytest.raises(KeyMismatch, match="no encryption key"):
        decode(Codec(), "wal/x", stored, digest)


def test_key_refuses_unencrypted_objects():
    stored, digest = encode(Codec(), "wal/x", b"plain")
    with pytest.raises(KeyMismatch, match="not encrypted"):
        decode(Codec(key=KEY), "wal/x", stored, digest)


def test_unencrypted_object_without_digest_is_refused():
    stored, _ = encode(Codec(), "wal/x", b"data")
    with pytest.raises(KeyMismatch, match="cannot be verified"):
        decode(Codec(), "wal/x", stored, {})


def test_encrypted_object_is_authenticated_by_its_tags_alone():
    """Without metadata, an encrypted object still decodes only if intact (AEAD)."""
    codec = Codec(key=KEY, chunk_log2=10)
    data = os.urandom(5000)
    stored, _ = encode(codec, "wal/x", data)
    assert decode(codec, "wal/x", stored, {}) == data
    for position in (len(stored) // 2, len(stored) - 1):
        damaged = bytearray(stored)
        damaged[position] ^= 0x01
        with pytest.raises(IntegrityError):
            decode(codec, "wal/x", bytes(damaged), {})
    with pytest.raises(IntegrityError):
        decode(codec, "wal/y", stored, {})


def test_object_digest_covers_the_stored_bytes_and_the_name(codec):
    stored, metadata = encode(codec, "wal/x", b"some wal " * 1000)
    expected = hashlib.sha256(b"walship v1 stored\x00wal/x\x00" + stored).hexdigest()
    assert metadata == {OBJECT_DIGEST_METADATA: f"sha256:{expected}"}


@pytest.mark.parametrize("codec", [Codec(), Codec(key=KEY)], ids=["plain", "encrypted"])
def test_objects_with_a_plaintext_digest_still_decode_and_are_checked(codec):
    data = os.urandom(3000) + bytes(3000)
    stored, metadata = legacy(codec, "wal/x", data)
    assert decode(codec, "wal/x", stored, metadata) == data
    damaged = bytearray(stored)
    damaged[len(stored) // 2] ^= 0x04
    with pytest.raises(IntegrityError):
        decode(codec, "wal/x", bytes(damaged), metadata)
    if codec.key is None:  # swapped (with its metadata): the digest is bound to the name
        with pytest.raises(IntegrityError):
            decode(codec, "wal/x", *legacy(codec, "wal/y", data))


def test_encrypted_output_hides_plaintext():
    data = b"very secret wal record " * 2000
    stored, metadata = encode(Codec(key=KEY, level=1), "wal/x", data)
    assert b"secret" not in stored and b"secret" not in str(metadata).encode()


def test_key_text_round_trips_and_hides_secret():
    key = EncryptionKey.generate()
    assert EncryptionKey.from_text(key.to_text()) == key
    assert key.to_text().split(":")[1].strip() not in repr(key)
    with pytest.raises(ConfigError):
        EncryptionKey.from_text("walship-key-v1:AAAA")
    with pytest.raises(ConfigError):
        EncryptionKey.from_text("not a key")


def _status(mode: int, uid: int):
    import os

    return os.stat_result((0o100000 | mode, 0, 0, 1, uid, 0, 60, 0, 0, 0))


@pytest.mark.parametrize("mode,uid,private", [
    (0o600, 1000, True), (0o400, 1000, True), (0o700, 1000, True),
    (0o640, 1000, False), (0o604, 1000, False), (0o620, 1000, False), (0o644, 1000, False),
    (0o600, 0, True), (0o640, 0, True),  # root may share a key with its group (root:postgres)
    (0o660, 0, False), (0o650, 0, False), (0o644, 0, False), (0o604, 0, False),
])
def test_which_key_files_are_private(mode, uid, private):
    """PostgreSQL's rule for its SSL key file: 0600 or less, or 0640 or less owned by root."""
    from walship.codec.keys import exposure

    assert (exposure(_status(mode, uid)) is None) == private


def test_key_file_errors_say_what_is_wrong_and_never_suggest_a_new_key(tmp_path):
    import os

    from walship.codec.keys import load_key_file

    key = tmp_path / "key"
    key.write_text(EncryptionKey.generate().to_text())
    os.chmod(key, 0o600)
    assert load_key_file(key)
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="not private") as caught:
        load_key_file(key)
    assert f"chmod 600 {key}" in caught.value.hint
    for body, why in ((b"walship-key-v1:AAAA\n", "holds 3 bytes"),
                      (b"\xff\xfe not text", "not ASCII"),
                      (b"[azure]\n", "does not start with")):
        key.write_bytes(body)
        os.chmod(key, 0o600)
        with pytest.raises(ConfigError, match=why) as caught:
            load_key_file(key)
        assert "not a walship key" in caught.value.what
        assert "keygen >" not in caught.value.one_line()
        assert "a new key cannot read" in caught.value.hint
