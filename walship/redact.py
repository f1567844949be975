"""Masking secrets out of text walship prints: URLs and messages from libraries.

Two functions, used wherever a URL or a foreign error text reaches stdout or stderr:

* :func:`mask_url` shows a URL without its user-info (``user:password@``) and query string (a
  SAS token: ``sv=...&sig=...``), each replaced by ``<redacted>``; scheme, host and path stay,
  so the operator still sees which repository or endpoint is meant.
* :func:`redact` does the same to free text (an exception's message): every query string, every
  user-info in a URL and every ``AccountKey=``, ``SharedAccessSignature=`` or ``sig=`` value is
  replaced, the text folded onto one line and shortened.

Standard library only (``re``): cheap to import. Masking twice changes nothing more.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "<redacted>"
_PATTERNS = [
    # user-info in any URL: scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s'\"<>?#]*@"), r"\1" + MASK + "@"),
    # query strings (SAS tokens)
    (re.compile(r"\?(?!" + MASK + r")[^\s'\"<>)]*"), "?" + MASK),
    # key-like values in connection strings and SAS tokens, and libpq's password keyword
    (re.compile(r"(?i)\b(AccountKey|SharedAccessSignature|sig|password)=[^;&\s'\"]*"),
     r"\1=" + MASK),
]


def mask_url(url: str) -> str:
    """``url`` with its user-info and query string (with any fragment) replaced by
    ``<redacted>``: ``https://<redacted>@host/path?<redacted>``."""
    return redact(url, limit=1000)


def redact(text: str, limit: int = 300, hide: Iterable[str] = ()) -> str:
    """``text`` on one line, without query strings, user-info, key-like values or any of the
    strings in ``hide`` (secrets a library may quote), and at most ``limit`` characters."""
    for secret in hide:
        if secret:
            text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    text = " ".join(text.split())
    return text[:limit]
