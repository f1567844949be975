"""Repository backends behind one protocol, chosen by URL scheme and imported lazily.

``open_storage("file:///srv/wal")``, ``open_storage("azure://container/prefix")`` or
``open_storage("memory://name")`` returns a :class:`~walship.storage.base.Storage`. A backend's
module (and its SDK) is imported only when a URL of its scheme is opened, so the Azure SDK never
costs anything to a ``file://`` user.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from walship.errors import ConfigError
from walship.storage.base import Storage

_BACKENDS = {
    "memory": ("walship.storage.memory", "MemoryStorage"),
    "file": ("walship.storage.local", "LocalStorage"),
    "azure": ("walship.storage.azure", "AzureStorage"),
}


@dataclass(frozen=True)
class AzureCredentials:
    """Azure settings from the environment or the config file. ``repr`` never shows a secret."""

    connection_string: str | None = field(default=None, repr=False)
    account: str | None = None
    account_key: str | None = field(default=None, repr=False)
    sas_token: str | None = field(default=None, repr=False)
    account_url: str | None = None


@dataclass(frozen=True)
class StorageOptions:
    """How a backend talks to its storage: retry budget, per-request timeout (seconds), and
    for Azure the credentials and transport (:mod:`walship.storage.azure`).

    ``deadline``, a :func:`time.monotonic` instant, bounds every request with its retries and
    back-offs: no request is sent, no back-off slept and no socket waited on past it; what is
    unfinished then fails as :class:`~walship.errors.Unavailable` (a wal-push or wal-fetch
    call's ``call_timeout``). None: only ``retries`` and ``timeout`` bound a request."""

    retries: int = 4
    timeout: float = 30.0
    azure: AzureCredentials = field(default_factory=AzureCredentials)
    azure_transport: str = "auto"  # "auto": REST for shared key and SAS, else the SDK; "sdk"
    deadline: float | None = None


SECONDARY_SUFFIX = "-secondary"


def secondary_endpoint(creds: AzureCredentials | None) -> str | None:
    """The blob endpoint of ``creds`` when it is an Azure account's read-only secondary
    (read-access geo-redundant storage), else None: ``https://ACCOUNT-secondary.blob.core.
    windows.net``, or path-style ``http://HOST:PORT/ACCOUNT-secondary`` (Azurite, the
    emulator). Read from ``account_url`` or a connection string's ``BlobEndpoint``."""
    if creds is None:
        return None
    url = creds.account_url
    if creds.connection_string:
        url = None
        for item in creds.connection_string.split(";"):
            name, _, value = item.partition("=")
            if name.strip().lower() == "blobendpoint":
                url = value.strip()
    if not url:
        return None
    parts = urlsplit(url)
    host_label = (parts.hostname or "").split(".", 1)[0]
    first_segment = parts.path.strip("/").split("/", 1)[0]
    if host_label.endswith(SECONDARY_SUFFIX) or first_segment.endswith(SECONDARY_SUFFIX):
        return url
    return None


def open_storage(url: str, options: StorageOptions | None = None) -> Storage:
    """Open the repository at ``url`` with the backend registered for its scheme."""
    scheme = urlsplit(url).scheme
    if scheme not in _BACKENDS:
        from walship.redact import mask_url

        raise ConfigError(f"unsupported repository URL {mask_url(url)!r}",
                          f"unknown scheme {scheme!r}" if scheme else "no scheme",
                          "use file:///absolute/path or azure://container[/prefix]")
    module_name, class_name = _BACKENDS[scheme]
    backend = getattr(importlib.import_module(module_name), class_name)
    if scheme == "memory":
        return backend(url)
    return backend(url, options or StorageOptions())
