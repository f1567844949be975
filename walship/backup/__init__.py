"""Base backups and point-in-time restore.

* :mod:`walship.backup.layout`: object keys (``backups/<NAME>/part.NNNNN``, ``.../manifest``);
* :mod:`walship.backup.manifest`: the manifest, the commit point of a backup (pure values);
* :mod:`walship.backup.catalog`: listing backups, reading and storing manifests, WAL coverage;
* :mod:`walship.backup.scan`: what is copied from the data directory and what is left out;
* :mod:`walship.backup.parts`: tar parts streamed in bounded memory;
* :mod:`walship.backup.source`: the PostgreSQL session that starts and stops a backup (psycopg);
* :mod:`walship.backup.push`: ``backup-push``; :mod:`walship.backup.fetch`: ``backup-fetch``;
  :mod:`walship.backup.restore`: ``restore``; :mod:`walship.backup.progress`: progress bars.

Every object goes through the repository's codec, exactly like WAL. Nothing here is imported by
``wal-push`` or ``wal-fetch``.
"""
