"""How walship reaches a PostgreSQL server: libpq's usual ``PG*`` environment, or ``--dbname``
given as a database name, a ``key=value`` string or a URI. psycopg is imported by the callers,
lazily: nothing on the WAL path needs it."""

from __future__ import annotations

import re
from urllib.parse import unquote


def connection_args(dbname: str | None, application: str) -> tuple[str, dict[str, object]]:
    """The conninfo string and keyword arguments for ``psycopg.connect`` (autocommit)."""
    kwargs: dict[str, object] = {"autocommit": True, "application_name": application}
    if dbname and ("=" in dbname or dbname.startswith(("postgres://", "postgresql://"))):
        return dbname, kwargs
    if dbname:
        kwargs["dbname"] = dbname
    return "", kwargs


def connection_secrets(dbname: str | None) -> tuple[str, ...]:
    """The password ``dbname`` carries (a URI's user-info, or a ``password=`` keyword), as
    written and decoded: libpq quotes parts of a malformed connection string in its errors
    (``invalid percent-encoded token: "..."``), so they are masked with
    :func:`walship.redact.redact` before they are printed."""
    found: list[str] = []
    for match in re.finditer(r"://[^/@?#]*?:([^/?#]*)@|password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)",
                             dbname or ""):
        value = match.group(1) or match.group(2) or ""
        found += [value, value.strip("'"), unquote(value)]
    return tuple(sorted({v for v in found if v}, key=len, reverse=True))
