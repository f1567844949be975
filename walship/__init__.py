"""walship: ships PostgreSQL's WAL and base backups to object storage and brings them back."""

__version__ = "0.1.0"
