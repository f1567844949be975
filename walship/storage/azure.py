"""Azure Blob Storage backend (``azure://CONTAINER[/PREFIX]``).

Each object is one block blob named ``PREFIX/KEY`` in the container, with the object's metadata
as the blob's metadata, so data and metadata become visible together, atomically.

Promises:

* **Create-only puts, no partial object ever visible.** An object of up to 17 MiB (the stored
  form of any WAL segment) is sent as one conditional Put Blob (``If-None-Match: *``). A larger
  one is staged as 4 MiB uncommitted blocks (a few in flight at once, so memory stays bounded)
  and made visible by one conditional Put Block List (``If-None-Match: *``): until that commit
  nothing is listed or readable under the key, and a put that fails or is killed before it
  leaves only uncommitted blocks, which Azure discards. A taken key is found by the conditional
  request itself (no HEAD on the hot path) and reported as
  :class:`~walship.errors.AlreadyExists`, the stored blob untouched.
* **Bounded retries.** Transient failures (connection errors, timeouts, 408, 429, 5xx) are
  retried ``options.retries`` times with the same short exponential back-offs on either
  transport, each request limited to ``options.timeout`` seconds to connect and per read. What
  still fails is :class:`~walship.errors.Unavailable`. With ``options.deadline`` (a call's
  ``call_timeout``), either transport stops retrying, and shortens its socket waits, so as to
  fail by then.
* **Honest "not found".** Only ``BlobNotFound`` is :class:`~walship.errors.NotFound`; a missing
  container is :class:`~walship.errors.RepositoryMissing`, an authentication or permission
  failure :class:`~walship.errors.StorageError`.
* **No secret leaks.** Keys, SAS tokens and connection strings never appear in ``url``, in a
  ``repr`` or in an error message (messages are reduced and stripped of query strings).
  TLS certificates are always verified (both transports honour ``REQUESTS_CA_BUNDLE``).

Two transports (``azure_transport``), one behaviour, one contract test suite:

* ``auto`` (the default): with an account key, a SAS token or DefaultAzureCredential's OAuth
  tokens (over https), reads, single-request puts and deletions speak the REST API directly
  (:mod:`walship.storage.azure_rest`, the standard library alone), so that wal-fetch, the
  prefetch worker, the background pusher and backup-fetch never import the blob SDK
  (140-300 ms) nor pay its per-request overhead (about 4 ms of CPU). Staged block uploads of
  larger objects and an HTTP proxy in the environment go through the SDK, with the same
  credential object.
* ``sdk``: everything through azure-storage-blob, a fallback should an endpoint ever disagree
  with the REST transport.

Credentials (:class:`~walship.storage.AzureCredentials`), first usable wins: a connection
string (its ``BlobEndpoint`` may name a custom endpoint such as Azurite); an account with its
key; an account (or account URL) with a SAS token; else ``DefaultAzureCredential`` (managed
identity, workload identity, ``az login``) for the account, imported only then.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from walship.errors import (AlreadyExists, ConfigError, NotFound, RepositoryMissing,
                            StorageError, Unavailable, WalshipError)
from walship.redact import mask_url, redact
from walship.storage import AzureCredentials, StorageOptions, azure_rest
from walship.storage.azure_rest import NetworkFailure, ServiceFailure
from walship.storage.base import (MetadataSource, ObjectInfo, check_key, check_metadata,
                                  effective_deadline)

# One request per object whenever the object fits: every request costs a round trip, a
# transaction on the bill, and (measured on Azurite) about 20 ms of the server's CPU, so a 6 MB
# WAL object sent as two blocks and a commit cost 62 ms of Azurite's CPU against 42 ms for one
# Put Blob, and read with two ranged GETs, 40 ms against 20 ms. 17 MiB holds the stored form of
# any 16 MiB segment, even incompressible and encrypted; bigger objects stream in 4 MiB pieces.
# Memory: one such buffer per transfer in flight.
SINGLE_PUT_MAX = 17 * 1024 * 1024  # objects up to this size go up in one Put Blob
BLOCK_SIZE = 4 * 1024 * 1024  # staged block size for larger objects
BLOCKS_IN_FLIGHT = 3  # concurrent block uploads per put (memory: about 4 blocks)
SINGLE_GET_MAX = 17 * 1024 * 1024  # bytes of the first GET: all of any object up to this
DOWNLOAD_CHUNK = 4 * 1024 * 1024  # bytes per further ranged GET while streaming a download
LIST_PAGE_MAX = 5000  # the service's largest List Blobs page
# Back-offs between retries: about 2, 2.75, 3.9, 5.6 ... seconds (+-0.5 s jitter).
_INITIAL_BACKOFF = 0.5
_INCREMENT_BASE = 1.5
_JITTER = 0.5

_CONTAINER_NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(?:-[a-z0-9]+)*$")
_ENV_HINT = ("set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT with "
             "AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN (AZURE_STORAGE_ACCOUNT_URL for a "
             "custom endpoint), or sign in for DefaultAzureCredential (managed identity, "
             "workload identity, az login)")
_AUTH_HINT = ("check the Azure credentials (AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_KEY, "
              "AZURE_STORAGE_SAS_TOKEN or the identity's role on the container)")


# -- credentials ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedAuth:
    """Which credential path applies, and the values it needs. ``repr`` shows no secret.

    ``method`` is ``"connection_string"``, ``"shared_key"``, ``"sas"`` or ``"default"``
    (DefaultAzureCredential, created on the first request that needs a token).
    """

    method: str
    account_url: str | None = None
    account: str | None = None
    connection_string: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)  # account key or SAS token


def resolve_auth(creds: AzureCredentials) -> ResolvedAuth:
    """Choose the credential path for ``creds``, or raise :class:`ConfigError` saying what to set.

    Order: connection string; account + key; account (or account URL) + SAS token; account (or
    account URL) alone with DefaultAzureCredential.
    """
    if creds.connection_string:
        return ResolvedAuth("connection_string", connection_string=creds.connection_string)
    account_url = creds.account_url.rstrip("/") if creds.account_url else None
    if creds.account and not account_url:
        if not re.fullmatch(r"[a-z0-9]{3,24}", creds.account):
            raise ConfigError(f"invalid Azure storage account name {creds.account!r}",
                              "account names are 3 to 24 lower-case letters and digits",
                              "check AZURE_STORAGE_ACCOUNT")
        account_url = f"https://{creds.account}.blob.core.windows.net"
    if creds.account_key:
        if not creds.account:
            raise ConfigError("Azure account key given without an account name",
                              "shared-key signing needs the account name",
                              "set AZURE_STORAGE_ACCOUNT along with AZURE_STORAGE_KEY")
        return ResolvedAuth("shared_key", account_url, creds.account, secret=creds.account_key)
    if not account_url:
        raise ConfigError("no Azure credentials are configured",
                          "an azure:// repository needs a connection string, or an account "
                          "(name or URL) to authenticate to", _ENV_HINT)
    if creds.sas_token:
        return ResolvedAuth("sas", account_url, creds.account,
                            secret=creds.sas_token.lstrip("?"))
    return ResolvedAuth("default", account_url, creds.account)


def _client_options(options: StorageOptions) -> dict[str, Any]:
    """Pipeline settings: bounded SDK retries with short back-offs, per-request timeouts, and
    with ``options.deadline``, a retry policy and a per-attempt policy that keep to it; and
    the REST transport's service version."""
    retries = max(0, int(options.retries))
    # (installed without a deadline too: a mirrored read may set this thread's time share)
    retry = _deadline_retry(options.deadline)
    policy = retry(initial_backoff=_INITIAL_BACKOFF,  # type: ignore[arg-type]
                   increment_base=_INCREMENT_BASE,  # type: ignore[arg-type]
                   random_jitter_range=_JITTER,  # type: ignore[arg-type]
                   retry_total=retries, retry_connect=retries, retry_read=retries,
                   retry_status=retries)
    return {
        # (appended after the retry policy: runs per attempt)
        "_additional_pipeline_policies": [_deadline_timeouts(options.deadline,
                                                             options.timeout)],
        "retry_policy": policy,
        "connection_timeout": options.timeout,
        "read_timeout": options.timeout,
        "max_single_put_size": SINGLE_PUT_MAX,
        "max_block_size": BLOCK_SIZE,
        "max_single_get_size": SINGLE_GET_MAX,
        "max_chunk_get_size": DOWNLOAD_CHUNK,
        # The service version the REST transport speaks, not the SDK's newest: one that Azure
        # and Azurite both serve (a strict Azurite refuses versions newer than it knows).
        "api_version": azure_rest.API_VERSION,
    }


_DEADLINE = "the call's deadline (call_timeout)"


def _deadline_retry(deadline: float | None) -> type:
    """The SDK's exponential retry policy, making no retry whose back-off ends past
    ``deadline`` (a :func:`time.monotonic` instant) or this thread's share of the time
    (:func:`walship.storage.base.effective_deadline`)."""
    from azure.storage.blob import ExponentialRetry

    class DeadlineRetry(ExponentialRetry):
        def increment(self, settings: dict[str, Any], request: Any, response: Any = None,
                      error: Any = None) -> bool:
            until = effective_deadline(deadline)
            if until is not None and time.monotonic() + self.get_backoff_time(settings) \
                    >= until:
                if error is not None:  # (told in the error line: see _translate)
                    error.walship_deadline = True
                return False
            return super().increment(settings, request, response=response, error=error)

    return DeadlineRetry


def _deadline_timeouts(deadline: float | None, timeout: float) -> Any:
    """A per-attempt pipeline policy: each attempt's connect and read timeouts are cut to what
    is left before ``deadline`` (or this thread's share of the time), and no attempt starts
    after it."""
    from azure.core.exceptions import ServiceResponseTimeoutError
    from azure.core.pipeline.policies import HTTPPolicy

    class DeadlineTimeouts(HTTPPolicy):  # type: ignore[type-arg]
        def send(self, request: Any) -> Any:
            until = effective_deadline(deadline)
            if until is None:
                return self.next.send(request)
            left = until - time.monotonic()
            if left <= 0:
                raise ServiceResponseTimeoutError(f"no answer within {_DEADLINE}")
            request.context.options["connection_timeout"] = max(0.001, min(timeout, left))
            request.context.options["read_timeout"] = max(0.001, min(timeout, left))
            return self.next.send(request)

    return DeadlineTimeouts()


def _build_client(auth: ResolvedAuth, options: StorageOptions,
                  identity: Any = None) -> tuple[Any, Any]:
    """The SDK's service client for ``auth``, and the credential object to close with it
    (``identity``, the DefaultAzureCredential already made for the REST transport, if any)."""
    from azure.storage.blob import BlobServiceClient

    kwargs = _client_options(options)
    if auth.method == "connection_string":
        try:
            client = BlobServiceClient.from_connection_string(auth.connection_string or "",
                                                              **kwargs)
        except (ValueError, TypeError, KeyError):
            raise ConfigError("invalid Azure storage connection string",
                              "it is malformed or lacks AccountName, AccountKey or an endpoint",
                              "check AZURE_STORAGE_CONNECTION_STRING") from None
        return client, None
    credential: Any
    closable = None
    if auth.method == "shared_key":
        from azure.core.credentials import AzureNamedKeyCredential

        credential = AzureNamedKeyCredential(auth.account or "", auth.secret or "")
    elif auth.method == "sas":
        from azure.core.credentials import AzureSasCredential

        credential = AzureSasCredential(auth.secret or "")
    else:
        credential = closable = identity or _default_credential()
    try:
        client = BlobServiceClient(auth.account_url or "", credential=credential, **kwargs)
    except ValueError:
        if auth.method == "default" and (auth.account_url or "").startswith("http://"):
            raise ConfigError(f"token credentials over {mask_url(auth.account_url or '')!r}",
                              "an OAuth token (managed identity, az login) is only sent over "
                              "https", "use an https:// AZURE_STORAGE_ACCOUNT_URL, or a key "
                              "or SAS token") from None
        raise ConfigError(f"invalid Azure account URL {mask_url(auth.account_url or '')!r}",
                          "it is not an http(s) URL", "check AZURE_STORAGE_ACCOUNT_URL") from None
    return client, closable


STORAGE_SCOPE = "https://storage.azure.com/.default"  # the OAuth scope of Azure Storage


def _default_credential() -> Any:
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


# -- error translation ---------------------------------------------------------------------------
def _redact(text: str) -> str:
    """``text`` on one line, without query strings or key-like values, and not too long."""
    return redact(text)


def _reason(error: BaseException) -> str:
    """A short, secret-free description of an SDK or network error."""
    from azure.core.exceptions import HttpResponseError

    if isinstance(error, HttpResponseError) and error.status_code:
        code = getattr(error, "error_code", None) or ""
        message = (error.message or "").split("\n", 1)[0] if isinstance(error.message, str) \
            else ""
        return _redact(f"HTTP {error.status_code} {code}: {message}".replace(" :", ":"))
    inner: BaseException = error
    for _ in range(5):  # the innermost cause names the network problem best
        nxt = getattr(inner, "inner_exception", None) or inner.__cause__
        if nxt is None or nxt is inner:
            break
        inner = nxt
    text = str(inner) or type(inner).__name__
    return _redact(f"{type(error).__name__}: {text}")


def _error_code(error: BaseException) -> str:
    code = getattr(error, "error_code", None)
    return str(getattr(code, "value", code) or "")


def translate_failure(what: str, *, where: str, status: int | None, code: str, reason: str,
                      denied: bool = False, conflict: bool = False) -> WalshipError:
    """Map a failed request (its HTTP status and ``x-ms-error-code``, or neither for a network
    failure) to walship's storage errors; both transports report through here."""
    if code == "ContainerNotFound":
        return RepositoryMissing(what, f"container {where} does not exist, so whether the "
                                 "object exists cannot be told",
                                 "create the container or fix the repository URL")
    if code == "BlobNotFound":
        return NotFound(what, "no such blob")
    if code in ("BlobAlreadyExists", "ConditionNotMet") or (
            conflict and status in (409, 412) and not code):
        return AlreadyExists(what, "the key is taken; the stored object is unchanged")
    if denied or status in (401, 403):
        return StorageError(what, f"access denied: {reason}", _AUTH_HINT)
    if status is not None:
        if status == 408 or status == 429 or status >= 500:
            return Unavailable(what, f"{reason} (after retries)",
                               "the storage service keeps failing; retry later")
        if status == 404:
            # A 404 that names neither the blob nor the container proves nothing.
            return StorageError(what, reason, "check the account URL and endpoint")
        return StorageError(what, reason)
    return Unavailable(what, f"{reason} (after retries)",
                       "check the network path to the storage account and the endpoint")


def _translate(error: BaseException, what: str, *, where: str) -> WalshipError:
    """Map an Azure SDK (or network) error to walship's storage errors."""
    from azure.core.exceptions import (AzureError, ClientAuthenticationError,
                                       HttpResponseError, ResourceExistsError,
                                       ResourceModifiedError)

    code = _error_code(error)
    status = getattr(error, "status_code", None) if isinstance(error, HttpResponseError) else None
    if status is None and not code and not isinstance(error, (AzureError, OSError)):
        return StorageError(what, _reason(error))  # neither a reply nor a network failure
    reason = _reason(error)
    if getattr(error, "walship_deadline", False):
        reason += f"; gave up at {_DEADLINE}"
    return translate_failure(what, where=where, status=status, code=code, reason=reason,
                             denied=isinstance(error, ClientAuthenticationError),
                             conflict=isinstance(error, (ResourceExistsError,
                                                         ResourceModifiedError)))


def _rest_failure(error: ServiceFailure | NetworkFailure, what: str, *, where: str,
                  conflict: bool = False) -> WalshipError:
    """Map a failure of the REST transport to walship's storage errors."""
    if isinstance(error, azure_rest.TokenFailure):
        return StorageError(what, f"access denied: no OAuth token: {error.message}",
                            _AUTH_HINT)
    if isinstance(error, ServiceFailure):
        return translate_failure(what, where=where, status=error.status, code=error.code,
                                 reason=_redact(str(error)), conflict=conflict)
    if isinstance(error, azure_rest.ObjectChanged):
        return Unavailable(what, _redact(str(error)), _CHANGED_HINT)
    return translate_failure(what, where=where, status=None, code="",
                             reason=_redact(str(error)))


_CHANGED_HINT = "retry; if it persists, check what deletes or rewrites objects"


def _mid_read(failure: WalshipError) -> WalshipError:
    """A failure after the object was found and its reading began: never "not found" (which
    wal-fetch would report to PostgreSQL as the end of the archive), whatever the service said
    of a later range request (the object deleted or replaced while it was read)."""
    if isinstance(failure, (NotFound, AlreadyExists)):
        return Unavailable(failure.what, "the object vanished or changed while it was read",
                           _CHANGED_HINT)
    return failure


_SDK_ERRORS: tuple[type[BaseException], ...] = ()


def _sdk_errors() -> tuple[type[BaseException], ...]:
    """The exceptions an SDK call may raise (imported with the SDK, on first need)."""
    global _SDK_ERRORS
    if not _SDK_ERRORS:
        from azure.core.exceptions import AzureError

        errors: tuple[type[BaseException], ...] = (AzureError, OSError)
        try:  # a connection dropped mid-body surfaces from requests/urllib3 themselves
            import requests
            import urllib3

            errors += (requests.RequestException, urllib3.exceptions.HTTPError)
        except ImportError:  # pragma: no cover - the SDK may run on another transport
            pass
        _SDK_ERRORS = errors
    return _SDK_ERRORS


def _timestamp(value: object) -> float | None:
    """A blob's Last-Modified (a datetime from the SDK) as POSIX seconds, None if absent."""
    timestamp = getattr(value, "timestamp", None)
    return float(timestamp()) if callable(timestamp) else None


# -- downloads -----------------------------------------------------------------------------------
class AzureDownload:
    """Streams one blob: a first GET of up to :data:`SINGLE_GET_MAX` bytes (all of a WAL
    object), then ranged GETs of :data:`DOWNLOAD_CHUNK` bytes, one at a time."""

    def __init__(self, info: ObjectInfo, chunks: Iterator[bytes], what: str, where: str) -> None:
        self.info = info
        self._chunks: Iterator[bytes] | None = chunks
        self._buffer = memoryview(b"")
        self._delivered = 0
        self._what = what
        self._where = where

    def _fill(self) -> bool:
        """Fetch the next chunk into the buffer; False at the (verified) end."""
        if self._chunks is None:
            return False
        try:
            chunk = next(self._chunks, None)
        except WalshipError:
            raise
        except _sdk_errors() as error:
            self.close()
            raise _mid_read(_translate(error, self._what, where=self._where)) from error
        if chunk is None:
            self._chunks = None
            if self._delivered != self.info.size:
                raise Unavailable(self._what, f"the transfer ended after {self._delivered} of "
                                  f"{self.info.size} bytes", "retry the read")
            return False
        self._buffer = memoryview(chunk)
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = [self._buffer.tobytes()]
            self._delivered += len(self._buffer)
            self._buffer = memoryview(b"")
            while self._fill():
                parts.append(self._buffer.tobytes())
                self._delivered += len(self._buffer)
                self._buffer = memoryview(b"")
            return b"".join(parts)
        if n == 0:
            return b""
        while not self._buffer:
            if not self._fill():
                return b""
        piece = self._buffer[:n].tobytes()
        self._buffer = self._buffer[n:]
        self._delivered += len(piece)
        return piece

    def close(self) -> None:
        chunks, self._chunks = self._chunks, None
        self._buffer = memoryview(b"")
        close = getattr(chunks, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001 - releasing a connection must not fail a read
                pass

    def __enter__(self) -> AzureDownload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the backend ---------------------------------------------------------------------------------
class AzureStorage:
    """A repository in an Azure Blob Storage container, under an optional name prefix."""

    def __init__(self, url: str, options: StorageOptions | None = None) -> None:
        options = options or StorageOptions()
        parts = urlsplit(url)
        container = parts.netloc
        prefix = parts.path.strip("/")
        if parts.scheme != "azure" or parts.query or parts.fragment or "@" in container \
                or not _CONTAINER_NAME.match(container):
            raise ConfigError("invalid Azure repository URL", "expected azure://CONTAINER[/PREFIX] "
                              "with a container name of 3-63 lower-case letters, digits and "
                              "single hyphens, and no query, user or secret in it",
                              "put credentials in AZURE_STORAGE_* variables, not in the URL")
        if prefix:
            try:
                check_key(prefix)
            except WalshipError:
                raise ConfigError(f"invalid prefix {prefix!r} in Azure repository URL",
                                  "prefix segments are [A-Za-z0-9._-] and do not start with a "
                                  "dot", "write azure://container/some/prefix") from None
        self.container = container
        self.prefix = prefix
        self.url = f"azure://{container}/{prefix}" if prefix else f"azure://{container}"
        self.options = options
        self.auth = resolve_auth(options.azure)
        self._service: Any = None
        self._credential: Any = None
        self._container_client: Any = None
        self._rest: azure_rest.Client | None = None
        endpoint = None
        if options.azure_transport != "sdk":
            endpoint = azure_rest.endpoint_from(
                self.auth.method, connection_string=self.auth.connection_string,
                account_url=self.auth.account_url, account=self.auth.account,
                secret=self.auth.secret, token=self._access_token)
        if endpoint is not None:
            self._rest = azure_rest.Client(endpoint, retries=options.retries,
                                           timeout=options.timeout, deadline=options.deadline)
            account = endpoint.account
        else:
            account = self._sdk().account_name
        self._where = f"{container!r} of account {account or '?'}"

    @property
    def transport(self) -> str:
        """How this repository is reached, for ``walship check``: ``rest`` or ``sdk``, and the
        credential kind."""
        kind = "rest" if self._rest is not None else "sdk"
        return f"{kind} ({self.auth.method.replace('_', ' ')})"

    def __repr__(self) -> str:
        return f"AzureStorage({self.url!r}, transport={self.transport})"

    # -- helpers -------------------------------------------------------------------------------
    def _sdk(self) -> Any:
        """The SDK's service client, built (and the SDK imported) on first need."""
        if self._service is None:
            self._service, self._credential = _build_client(self.auth, self.options,
                                                            self._credential)
        return self._service

    def _access_token(self) -> tuple[str, float]:
        """An OAuth token for Azure Storage from DefaultAzureCredential (made, and azure-identity
        imported, on first need): the REST transport's token source."""
        try:
            if self._credential is None:
                self._credential = _default_credential()
            token = self._credential.get_token(STORAGE_SCOPE)
        except Exception as error:  # noqa: BLE001 - azure-identity's errors say what is missing
            first = str(error).strip().split("\n", 1)[0] or type(error).__name__
            raise azure_rest.TokenFailure(_redact(first)) from None
        return token.token, float(token.expires_on)

    @property
    def _container(self) -> Any:
        if self._container_client is None:
            self._container_client = self._sdk().get_container_client(self.container)
        return self._container_client

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _blob(self, key: str) -> Any:
        return self._container.get_blob_client(self._name(key))

    def _fail(self, error: BaseException, what: str) -> WalshipError:
        return _translate(error, what, where=self._where)

    # -- the protocol --------------------------------------------------------------------------
    def put(self, key: str, data: Iterable[bytes], *,
            metadata: MetadataSource | None = None) -> ObjectInfo:
        name = self._name(key)
        what = f"cannot store {key} in {self.url}"
        buffer = bytearray()
        uploader: _BlockUploader | None = None
        size = 0
        try:
            for chunk in data:  # errors of the source itself propagate unchanged
                size += len(chunk)
                buffer += chunk
                if uploader is None and len(buffer) > SINGLE_PUT_MAX:
                    # too big for one request
                    uploader = _BlockUploader(self._blob(key), self._fail, what)
                if uploader is not None:
                    while len(buffer) > BLOCK_SIZE:  # a full block and more to come: send it
                        uploader.stage(bytes(buffer[:BLOCK_SIZE]))
                        del buffer[:BLOCK_SIZE]
            meta = dict(check_metadata(metadata() if metadata else {}))
            if uploader is None and self._rest is not None:
                headers = {"x-ms-blob-type": "BlockBlob", "If-None-Match": "*",
                           "Content-Type": "application/octet-stream",
                           "Content-Length": str(len(buffer)),
                           **azure_rest.metadata_headers(meta)}
                try:
                    self._rest.call("PUT", self._rest.path(self.container, name),
                                    headers=headers, body=buffer)  # (sent as is: no copy)
                except (ServiceFailure, NetworkFailure) as error:
                    raise _rest_failure(error, what, where=self._where, conflict=True) \
                        from None
            elif uploader is None:
                try:
                    self._blob(key).upload_blob(bytes(buffer), length=len(buffer),
                                                overwrite=False, metadata=meta,
                                                max_concurrency=1)
                except _sdk_errors() as error:
                    raise self._fail(error, what) from error
            else:
                if buffer:
                    uploader.stage(bytes(buffer))
                buffer.clear()
                uploader.commit(meta)
        finally:
            if uploader is not None:
                uploader.shutdown()
        return ObjectInfo(key, size, meta)

    def get(self, key: str) -> AzureDownload | RestDownload:
        what = f"cannot read {key} from {self.url}"
        if self._rest is not None:
            path = self._rest.path(self.container, self._name(key))
            try:
                response, conn, attempts = self._rest.send("GET", path)
            except (ServiceFailure, NetworkFailure) as error:
                raise _rest_failure(error, what, where=self._where) from None
            size = azure_rest.size_of(response)
            headers = {k.lower(): v for k, v in response.getheaders()}
            info = ObjectInfo(key, size, azure_rest.metadata_of(headers),
                              azure_rest.parse_http_date(headers.get("last-modified")))
            body = azure_rest.Download(self._rest, path, response, conn, attempts, size)
            return RestDownload(info, body, what, self._where)
        blob = self._blob(key)
        try:
            downloader = blob.download_blob(max_concurrency=1)
            props = downloader.properties
            info = ObjectInfo(key, int(downloader.size), dict(props.metadata or {}),
                              _timestamp(props.last_modified))
            chunks = iter(downloader.chunks())
        except _sdk_errors() as error:
            raise self._fail(error, what) from error
        return AzureDownload(info, chunks, what, self._where)

    def head(self, key: str) -> ObjectInfo:
        what = f"cannot describe {key} in {self.url}"
        if self._rest is not None:
            try:
                reply = self._rest.call("HEAD", self._rest.path(self.container,
                                                                self._name(key)))
            except (ServiceFailure, NetworkFailure) as error:
                raise _rest_failure(error, what, where=self._where) from None
            return ObjectInfo(key, int(reply.headers.get("content-length") or 0),
                              azure_rest.metadata_of(reply.headers),
                              azure_rest.parse_http_date(reply.headers.get("last-modified")))
        blob = self._blob(key)
        try:
            props = blob.get_blob_properties()
        except _sdk_errors() as error:
            raise self._fail(error, what) from error
        return ObjectInfo(key, int(props.size), dict(props.metadata or {}),
                          _timestamp(props.last_modified))

    def list(self, prefix: str = "", *, limit: int | None = None) -> Iterator[ObjectInfo]:
        if limit is not None and limit <= 0:
            return
        base = f"{self.prefix}/" if self.prefix else ""
        what = f"cannot list {prefix or 'objects'} in {self.url}"
        listed = 0
        for name, size, meta, modified in (self._rest_listing(base + prefix, limit, what)
                                           if self._rest is not None
                                           else self._sdk_listing(base + prefix, limit, what)):
            key = name[len(base):]  # Azure lists in lexicographic (key) order
            if not _is_key(key):
                continue  # not an object walship could have written (or can read)
            yield ObjectInfo(key, size, meta, modified)
            listed += 1
            if listed == limit:
                return

    def _rest_listing(self, start: str, limit: int | None, what: str
                      ) -> Iterator[tuple[str, int, dict[str, str], float | None]]:
        assert self._rest is not None
        query = {"restype": "container", "comp": "list", "prefix": start,
                 "include": "metadata"}
        if limit is not None:
            query["maxresults"] = str(min(limit, LIST_PAGE_MAX))
        while True:
            try:
                reply = self._rest.call("GET", self._rest.path(self.container), query=query)
                blobs, marker = azure_rest.listing_page(reply.body)
            except (ServiceFailure, NetworkFailure) as error:
                raise _rest_failure(error, what, where=self._where) from None
            except (ValueError, SyntaxError) as error:  # (xml.etree's ParseError, a bad number)
                raise StorageError(what, f"the listing cannot be read: {error}") from None
            yield from blobs
            if not marker:
                return
            query["marker"] = marker

    def _sdk_listing(self, start: str, limit: int | None, what: str
                     ) -> Iterator[tuple[str, int, dict[str, str], float | None]]:
        page: dict[str, int] = {}
        if limit is not None:
            page["results_per_page"] = min(limit, LIST_PAGE_MAX)
        try:
            for props in self._container.list_blobs(name_starts_with=start,
                                                    include=["metadata"], **page):
                yield (props.name, int(props.size), dict(props.metadata or {}),
                       _timestamp(props.last_modified))
        except _sdk_errors() as error:
            raise self._fail(error, what) from error

    def delete(self, key: str) -> None:
        what = f"cannot delete {key} from {self.url}"
        if self._rest is not None:
            try:
                self._rest.call("DELETE", self._rest.path(self.container, self._name(key)))
            except (ServiceFailure, NetworkFailure) as error:
                failure = _rest_failure(error, what, where=self._where)
                if isinstance(failure, NotFound):
                    return
                raise failure from None
            return
        blob = self._blob(key)
        try:
            blob.delete_blob()
        except _sdk_errors() as error:
            failure = self._fail(error, what)
            if isinstance(failure, NotFound):
                return
            raise failure from error

    def close(self) -> None:
        if self._rest is not None:
            self._rest.close()
        try:
            if self._service is not None:
                self._service.close()
        finally:
            if self._credential is not None:
                self._credential.close()


class RestDownload:
    """Streams one blob through the REST transport (:class:`azure_rest.Download`), with its
    failures translated to walship's storage errors."""

    def __init__(self, info: ObjectInfo, body: azure_rest.Download, what: str,
                 where: str) -> None:
        self.info = info
        self._body = body
        self._what = what
        self._where = where

    def read(self, n: int = -1) -> bytes:
        try:
            if n is None or n < 0:
                parts = []
                while piece := self._body.read(1 << 20):
                    parts.append(piece)
                return b"".join(parts)
            return self._body.read(n) if n else b""
        except (ServiceFailure, NetworkFailure) as error:
            self._body.close()
            raise _mid_read(_rest_failure(error, self._what, where=self._where)) from None

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> RestDownload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_key(key: str) -> bool:
    """True if ``key`` is a valid object key (listing skips foreign blob names)."""
    try:
        check_key(key)
    except WalshipError:
        return False
    return True


class _BlockUploader:
    """Stages blocks of one put on a small thread pool, at most a few in flight, then commits."""

    def __init__(self, blob: Any, fail: Callable[[BaseException, str], WalshipError],
                 what: str) -> None:
        self._blob = blob
        self._fail = fail
        self._what = what
        self._prefix = secrets.token_hex(8)  # unique per upload: racing puts never share ids
        self._ids: list[str] = []
        self._pool = ThreadPoolExecutor(max_workers=BLOCKS_IN_FLIGHT,
                                        thread_name_prefix="walship-azure-put")
        self._in_flight: deque[Future[Any]] = deque()

    def _wait_one(self) -> None:
        try:
            self._in_flight.popleft().result()
        except _sdk_errors() as error:
            raise self._fail(error, self._what) from error

    def stage(self, block: bytes) -> None:
        while len(self._in_flight) >= BLOCKS_IN_FLIGHT:
            self._wait_one()  # bounded memory; raises the first failure
        block_id = f"{self._prefix}-{len(self._ids):08d}"  # equal lengths; the SDK base64s it
        self._ids.append(block_id)
        self._in_flight.append(self._pool.submit(self._blob.stage_block, block_id, block,
                                                 length=len(block)))

    def commit(self, metadata: dict[str, str]) -> None:
        while self._in_flight:
            self._wait_one()
        from azure.core import MatchConditions

        try:
            self._blob.commit_block_list(self._ids, metadata=metadata,
                                         match_condition=MatchConditions.IfMissing)
        except _sdk_errors() as error:
            failure = self._fail(error, self._what)
            if _error_code(error) == "InvalidBlockList" and self._exists():
                # A concurrent put committed first, and Azure dropped our uncommitted blocks.
                failure = AlreadyExists(self._what, "another writer committed the key first")
            raise failure from error

    def _exists(self) -> bool:
        try:
            self._blob.get_blob_properties()
        except _sdk_errors():
            return False
        return True

    def shutdown(self) -> None:
        for future in self._in_flight:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._in_flight.clear()


__all__ = ["AzureDownload", "AzureStorage", "ResolvedAuth", "RestDownload", "resolve_auth"]
