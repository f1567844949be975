"""Encryption keys: the key file format, key ids, and the keys derived from the master key.

A key file holds one line, ``walship-key-v1:`` followed by 32 random bytes in base64 (made by
``walship keygen``). From that master key walship derives, with HMAC-SHA256 and HKDF-SHA256:

* the key id, 8 bytes written into every object's header, so that a wrong key is reported as
  such instead of as corruption;
* the digest key, which makes the plaintext digest kept in object metadata a keyed MAC, so that
  metadata reveals nothing about the content;
* one AES-256-GCM key per object, from a random 16-byte salt stored in the object's header, so
  that nonces never repeat under one key however many objects are written.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stat
from dataclasses import dataclass, field

from walship.errors import ConfigError

KEY_PREFIX = "walship-key-v1:"
KEY_BYTES = 32
# A key that cannot be read must never be "fixed" with a new one: what the old key encrypted
# could then no longer be read.
_DAMAGED_HINT = ("check that it names the file walship keygen made, or restore that file from "
                 "your copy; a new key cannot read what this one encrypted")


def _hkdf_sha256(secret: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869) with one output block."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


@dataclass(frozen=True)
class EncryptionKey:
    """A 32-byte master key. Its repr never shows the secret."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise ConfigError("invalid encryption key", f"it has {len(self.secret)} bytes, "
                              f"not {KEY_BYTES}", _DAMAGED_HINT)

    @property
    def key_id(self) -> bytes:
        """8 bytes identifying this key (not secret: reveals nothing about the key)."""
        return hmac.new(self.secret, b"walship v1 key id", hashlib.sha256).digest()[:8]

    @property
    def digest_key(self) -> bytes:
        """The key of the plaintext MAC kept in object metadata."""
        return hmac.new(self.secret, b"walship v1 plaintext digest", hashlib.sha256).digest()

    def object_key(self, salt: bytes) -> bytes:
        """The AES-256-GCM key of one object, derived from the object's salt."""
        return _hkdf_sha256(self.secret, salt, b"walship v1 aes-256-gcm stream")

    def to_text(self) -> str:
        """The key file's content."""
        return KEY_PREFIX + base64.b64encode(self.secret).decode() + "\n"

    @classmethod
    def generate(cls) -> EncryptionKey:
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def from_text(cls, text: str, source: str = "key") -> EncryptionKey:
        text = text.strip()
        if not text.startswith(KEY_PREFIX):
            raise ConfigError(f"{source} is not a walship key", f"it does not start with "
                              f"{KEY_PREFIX}", _DAMAGED_HINT)
        try:
            secret = base64.b64decode(text[len(KEY_PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{source} is not a walship key", "its base64 is malformed",
                              _DAMAGED_HINT) from None
        if len(secret) != KEY_BYTES:
            raise ConfigError(f"{source} is not a walship key", f"it holds {len(secret)} "
                              f"bytes, not {KEY_BYTES}", _DAMAGED_HINT)
        return cls(secret)


def exposure(status: os.stat_result) -> str | None:
    """How a file holding a secret is open to other users, or None when it is private.

    PostgreSQL's rule for its SSL key file: a file owned by anyone but root must give group and
    others nothing (0600 or less, as ssh wants of a private key); a file owned by root may also
    let its group read it (0640 or less: ``root:postgres`` shares it with the server's user
    without letting that user change it). Who runs walship does not matter: root may read
    postgres's 0600 key, and a 0644 key is refused to root as well.
    """
    allowed = 0o640 if status.st_uid == 0 else 0o600
    extra = stat.S_IMODE(status.st_mode) & 0o077 & ~allowed
    if not extra:
        return None
    who = " and ".join(name for name, bits in (("its group", 0o070), ("other users", 0o007))
                       if extra & bits)
    return f"{who} can get at it (mode {stat.S_IMODE(status.st_mode):04o})"


def refuse_exposed_key(path: str | os.PathLike[str], status: os.stat_result) -> None:
    """Raise :class:`ConfigError` when the key file ``status`` describes is open to others."""
    problem = exposure(status)
    if problem is not None:
        raise ConfigError(f"encryption key file {path} is not private", problem,
                          f"chmod 600 {path}; a key owned by root may also be 640, shared "
                          f"with its group")


def load_key_file(path: str | os.PathLike[str]) -> EncryptionKey:
    """Read a key file, with a one-line error (never the key) when it cannot be used: it must
    exist, be a regular file (anything else, a FIFO or a device, is refused at once, never
    waited on), be private (:func:`refuse_exposed_key`) and hold one key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as handle:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"encryption key file {path} is not a regular file",
                                  hint="point encryption_key_file at the file walship keygen "
                                  "wrote")
            refuse_exposed_key(path, st)
            text = handle.read().decode("ascii")
    except FileNotFoundError:
        raise ConfigError(f"encryption key file {path} does not exist", hint="check "
                          "WALSHIP_ENCRYPTION_KEY_FILE / --encryption-key-file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"encryption key file {path} is not a walship key",
                          "it is not ASCII text", _DAMAGED_HINT) from None
    except OSError as error:
        raise ConfigError(f"cannot read encryption key file {path}",
                          os.strerror(error.errno) if error.errno else type(error).__name__,
                          "check its owner and permissions") from None
    return EncryptionKey.from_text(text, f"encryption key file {path}")
