"""How walship reaches a PostgreSQL server: libpq's usual ``PG*`` environment, or ``--dbname``
given as a database name, a ``key=value`` string or a URI. psycopg is imported by the callers,
lazily: nothing on the WAL path needs it."""

from __future__ import annotations


def connection_args(dbname: str | None, application: str) -> tuple[str, dict[str, object]]:
    """The conninfo string and keyword arguments for ``psycopg.connect`` (autocommit)."""
    kwargs: dict[str, object] = {"autocommit": True, "application_name": application}
    if dbname and ("=" in dbname or dbname.startswith(("postgres://", "postgresql://"))):
        return dbname, kwargs
    if dbname:
        kwargs["dbname"] = dbname
    return "", kwargs
