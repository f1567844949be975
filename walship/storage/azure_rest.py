"""Azure Blob Storage's REST API spoken with the standard library alone, for the requests on
the WAL and restore paths: Get Blob, Get Blob Properties, List Blobs, a single Put Blob and
Delete Blob.

Why: importing the Azure SDK costs 140-300 ms (more than a whole prefetch window of segments),
and each of its requests about 4 ms of CPU more than the request itself (measured: a 2 MB GET
took 5.0 ms of client CPU through the SDK, 1.2 ms here). Every walship process that only
reads (wal-fetch, its prefetch worker, backup-fetch, restore) or only puts small objects (the
background pusher) then never imports it. :class:`walship.storage.azure.AzureStorage` uses this
transport for a shared key, a SAS token, or OAuth tokens (DefaultAzureCredential, over HTTPS
only; azure-identity is then imported for the tokens, not the blob SDK), with no HTTP proxy
configured; a proxy, staged block uploads, and ``azure_transport = "sdk"`` go through the SDK.

Promises (the same as the SDK path's):

* **Bounded retries.** Connection errors, timeouts, 408, 429 and 5xx are retried ``retries``
  times with the SDK's back-offs (about 2, 2.75, 3.9, 5.6 s, +-0.5 s); a request on a kept-alive
  connection that the server had closed is resent at once on a new one. A download cut mid-body
  resumes where it stopped (a ranged GET that must match the first response's ETag), within
  the same budget. What still fails is :class:`~walship.errors.Unavailable`.
* **A deadline.** With ``deadline`` (a :func:`time.monotonic` instant: the call's
  ``call_timeout``), no request is sent, no back-off slept and no socket waited on past it: each
  socket wait is limited to what is left, a retry whose back-off would end past it is not made.
* **Verified TLS**, against ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` when set (as the SDK's
  transport does) or ``SSL_CERT_FILE``, else against certifi's bundle, the SDK's default.
* **No secret** in an error message, a ``repr`` or a log: the account key only signs
  (SharedKey), a SAS token only travels in the request's query string, which no message shows,
  and an OAuth token only in the Authorization header; it is renewed TOKEN_MARGIN seconds
  before it expires.
* **Bounded memory.** A download streams from the socket, a listing holds one page.

Only object keys that :func:`walship.storage.base.check_key` accepts reach this module, so a
blob name needs no escaping in a URL path.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import math
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from walship.storage.base import effective_deadline

API_VERSION = "2021-08-06"  # a service version that Azure and Azurite both serve
_RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                    "all_proxy")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_META = "x-ms-meta-"
_DEADLINE = "the call's deadline (call_timeout)"
TOKEN_MARGIN = 300.0  # seconds of validity left under which an OAuth token is renewed
IDLE_SECONDS = 60.0  # a kept-alive connection idle longer is not reused (Azure's load
# balancers and NAT gateways drop idle flows after 4 minutes by default)


@dataclass(frozen=True)
class Endpoint:
    """Where the account's blob service answers and how to authenticate to it: a shared key
    (``key``), a SAS token (``sas``) or an OAuth token source (``token``). ``repr`` shows no
    secret."""

    scheme: str
    host: str
    port: int | None
    base_path: str  # "" or e.g. "/devstoreaccount1" for a path-style (emulator) endpoint
    account: str
    key: bytes | None = field(default=None, repr=False)
    sas: str | None = field(default=None, repr=False)
    # OAuth: returns (access token, expiry in POSIX seconds), e.g. from DefaultAzureCredential
    token: Callable[[], tuple[str, float]] | None = field(default=None, repr=False,
                                                           compare=False)


@dataclass(frozen=True)
class Response:
    """Status, headers (names lower-cased) and, for a listing, the body of one reply."""

    status: int
    headers: Mapping[str, str]
    body: bytes = b""


class ServiceFailure(Exception):
    """A reply that was not a success, after the retries it deserved: status and error code
    for the backend to translate (:func:`walship.storage.azure.translate_failure`)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}".strip() + (f": {message}" if message else ""))
        self.status = status
        self.code = code


class TokenFailure(ServiceFailure):
    """No OAuth token could be had (the identity is missing, not allowed, or its endpoint is
    down): reported as access denied."""

    def __init__(self, message: str) -> None:
        super().__init__(401, "NoAccessToken", message)
        self.message = message


class NetworkFailure(Exception):
    """The service could not be reached or stopped answering, after the retries."""


class ObjectChanged(NetworkFailure):
    """A download could not be resumed: the blob was deleted or replaced while it was read."""


def endpoint_from(method: str, *, connection_string: str | None = None,
                  account_url: str | None = None, account: str | None = None,
                  secret: str | None = None,
                  token: Callable[[], tuple[str, float]] | None = None) -> Endpoint | None:
    """The endpoint for one resolved credential (see :class:`~walship.storage.azure.ResolvedAuth`),
    or None when this transport cannot serve it and the SDK must: a proxy in the environment,
    a connection string it does not fully understand, or token credentials without a
    ``token`` source. OAuth bearer tokens travel only over HTTPS."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None  # the SDK's transport honours proxies; this one does not
    if method == "connection_string":
        return _from_connection_string(connection_string or "")
    if method == "default":
        parts = urlsplit(account_url or "")
        if token is None or parts.scheme != "https" or not parts.hostname or parts.query:
            return None
        return Endpoint(parts.scheme, parts.hostname, parts.port, parts.path.rstrip("/"),
                        account or parts.hostname.split(".", 1)[0], token=token)
    if method not in ("shared_key", "sas") or not account_url or not secret:
        return None
    parts = urlsplit(account_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        return None
    name = account or (parts.hostname.split(".", 1)[0] if method == "sas" else "")
    if method == "shared_key":
        try:
            key = base64.b64decode(secret, validate=True)
        except ValueError:
            return None  # the SDK explains a malformed key
        return Endpoint(parts.scheme, parts.hostname, parts.port, parts.path.rstrip("/"), name,
                        key=key)
    return Endpoint(parts.scheme, parts.hostname, parts.port, parts.path.rstrip("/"), name,
                    sas=secret.lstrip("?"))


def _from_connection_string(text: str) -> Endpoint | None:
    fields: dict[str, str] = {}
    for item in text.split(";"):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep:
            return None
        fields[name.strip().lower()] = value.strip()
    known = {"defaultendpointsprotocol", "accountname", "accountkey", "blobendpoint",
             "endpointsuffix", "sharedaccesssignature", "queueendpoint", "tableendpoint",
             "fileendpoint"}
    if set(fields) - known or not fields.get("accountname"):
        return None  # e.g. UseDevelopmentStorage: the SDK knows what it means
    account = fields["accountname"]
    url = fields.get("blobendpoint")
    if not url:
        protocol = fields.get("defaultendpointsprotocol", "https")
        url = f"{protocol}://{account}.blob.{fields.get('endpointsuffix', 'core.windows.net')}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        return None
    base = parts.path.rstrip("/")
    if fields.get("accountkey"):
        try:
            key = base64.b64decode(fields["accountkey"], validate=True)
        except ValueError:
            return None
        return Endpoint(parts.scheme, parts.hostname, parts.port, base, account, key=key)
    if fields.get("sharedaccesssignature"):
        return Endpoint(parts.scheme, parts.hostname, parts.port, base, account,
                        sas=fields["sharedaccesssignature"].lstrip("?"))
    return None


def http_date(when: float | None = None) -> str:
    """RFC 1123 time, as the x-ms-date header wants it (no locale, no email module)."""
    t = time.gmtime(when)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


def parse_http_date(text: str | None) -> float | None:
    """POSIX seconds of an RFC 1123 time such as ``Wed, 25 Nov 2026 04:00:00 GMT``."""
    try:
        _, day, month, year, clock, _ = (text or "").split()
        hour, minute, second = (int(v) for v in clock.split(":"))
        y, m, d = int(year), _MONTHS.index(month) + 1, int(day)
    except ValueError:
        return None
    # days from the civil date (proleptic Gregorian), as in Howard Hinnant's algorithm
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    return float(days * 86400 + hour * 3600 + minute * 60 + second)


def backoff(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): the SDK path's schedule."""
    return max(0.0, 0.5 + 1.5 ** (attempt + 1) + random.uniform(-0.5, 0.5))


class Client:
    """Signed requests to one account over a small pool of kept-alive connections (one per
    thread in flight; safe to share between threads)."""

    def __init__(self, endpoint: Endpoint, *, retries: int, timeout: float,
                 deadline: float | None = None) -> None:
        self.endpoint = endpoint
        self.retries = max(0, int(retries))
        self.timeout = timeout
        self.deadline = deadline  # time.monotonic() instant, or None
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []  # (conn, idle since)
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._bearer: tuple[str, float] | None = None  # (token, expiry) while valid

    # -- the deadline ----------------------------------------------------------------------------
    def _left(self) -> float:
        """Seconds left before the deadline, or this thread's share of it (infinite without
        either: :func:`walship.storage.base.effective_deadline`)."""
        deadline = effective_deadline(self.deadline)
        return math.inf if deadline is None else deadline - time.monotonic()

    def _socket_timeout(self) -> float:
        """The timeout of the next socket wait: ``timeout``, or less near the deadline."""
        return max(0.001, min(self.timeout, self._left()))

    def arm(self, conn: http.client.HTTPConnection) -> None:
        """Limit the next waits on ``conn`` to :meth:`_socket_timeout`; raise
        :class:`NetworkFailure` once the deadline has passed."""
        if self._left() <= 0:
            raise NetworkFailure(f"no answer within {_DEADLINE}")
        conn.timeout = self._socket_timeout()
        if conn.sock is not None:
            conn.sock.settimeout(conn.timeout)

    def retry_or_raise(self, attempt: int, failure: Exception) -> None:
        """Sleep the back-off before retry ``attempt`` (0-based), or raise ``failure`` when the
        retries are spent or the back-off would end past the deadline."""
        pause = backoff(attempt)
        if attempt >= self.retries:
            raise failure
        if pause >= self._left():
            if isinstance(failure, NetworkFailure):
                failure = NetworkFailure(f"{failure}; gave up at {_DEADLINE}")
            raise failure
        time.sleep(pause)

    # -- connections ---------------------------------------------------------------------------
    def _tls(self) -> ssl.SSLContext:
        if self._context is None:
            bundle = (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
                      or os.environ.get("SSL_CERT_FILE"))
            if not bundle:
                try:
                    import certifi  # the SDK's transport (requests) trusts certifi's bundle

                    bundle = certifi.where()
                except ImportError:  # pragma: no cover - certifi comes with the SDK
                    bundle = None
            if bundle and os.path.isdir(bundle):
                self._context = ssl.create_default_context(capath=bundle)
            else:
                self._context = ssl.create_default_context(cafile=bundle)
        return self._context

    def _connect(self) -> http.client.HTTPConnection:
        e = self.endpoint
        if e.scheme == "https":
            return http.client.HTTPSConnection(e.host, e.port, timeout=self._socket_timeout(),
                                               context=self._tls())
        return http.client.HTTPConnection(e.host, e.port, timeout=self._socket_timeout())

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        """A kept-alive connection idle for less than IDLE_SECONDS, else a new one (older ones
        may have been dropped silently by a NAT or load balancer on the way, and a request on
        them would hang until the timeout)."""
        stale = []
        try:
            with self._lock:
                while self._idle:
                    conn, since = self._idle.pop()
                    if time.monotonic() - since < IDLE_SECONDS:
                        return conn, True
                    stale.append(conn)
        finally:
            for conn in stale:
                conn.close()
        return self._connect(), False

    def release(self, conn: http.client.HTTPConnection) -> None:
        """Give back a connection whose last response was read to its end."""
        with self._lock:
            self._idle.append((conn, time.monotonic()))

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    # -- requests ------------------------------------------------------------------------------
    def path(self, container: str, blob: str = "") -> str:
        return f"{self.endpoint.base_path}/{container}" + (f"/{blob}" if blob else "")

    def _sign(self, method: str, path: str, query: Mapping[str, str],
              headers: dict[str, str]) -> str:
        """The request target; adds the date, version and (shared key) Authorization headers."""
        e = self.endpoint
        headers["x-ms-date"] = http_date()
        headers["x-ms-version"] = API_VERSION
        target = path
        if query:
            target += "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
        if e.sas is not None:
            return target + ("&" if query else "?") + e.sas
        if e.token is not None:
            headers["Authorization"] = f"Bearer {self._access_token()}"
            return target
        lowered = {k.lower(): v for k, v in headers.items()}
        length = lowered.get("content-length", "")
        canonical_headers = "".join(f"{k}:{v.strip()}\n" for k, v in sorted(lowered.items())
                                    if k.startswith("x-ms-"))
        canonical_resource = f"/{e.account}{path}" + "".join(
            f"\n{k.lower()}:{v}" for k, v in sorted(query.items()))
        to_sign = "\n".join([
            method, lowered.get("content-encoding", ""), lowered.get("content-language", ""),
            "" if length == "0" else length, lowered.get("content-md5", ""),
            lowered.get("content-type", ""), "", lowered.get("if-modified-since", ""),
            lowered.get("if-match", ""), lowered.get("if-none-match", ""),
            lowered.get("if-unmodified-since", ""), lowered.get("range", ""),
        ]) + "\n" + canonical_headers + canonical_resource
        signature = base64.b64encode(hmac.new(e.key or b"", to_sign.encode(),
                                              hashlib.sha256).digest()).decode()
        headers["Authorization"] = f"SharedKey {e.account}:{signature}"
        return target

    def _access_token(self) -> str:
        """The OAuth token, fetched again once it has less than TOKEN_MARGIN seconds left."""
        with self._lock:
            bearer = self._bearer
        if bearer is None or bearer[1] - time.time() < TOKEN_MARGIN:
            assert self.endpoint.token is not None
            bearer = self.endpoint.token()
            with self._lock:
                self._bearer = bearer
        return bearer[0]

    def send(self, method: str, path: str, query: Mapping[str, str] | None = None,
             headers: Mapping[str, str] | None = None,
             body: bytes | bytearray | None = None, *, attempts_used: int = 0
             ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection, int]:
        """Send one request, with the retries it deserves; return the successful response (its
        body still to read), its connection (for :meth:`finish` once the body is read), and
        the retries used so far. A final failure raises :class:`ServiceFailure` or
        :class:`NetworkFailure`."""
        attempt = attempts_used
        while True:
            wanted = dict(headers or {})
            target = self._sign(method, path, query or {}, wanted)  # (TokenFailure: no token)
            conn, reused = self._take()
            try:
                self.arm(conn)
            except NetworkFailure:
                conn.close()
                raise
            try:
                conn.request(method, target, body=body, headers=wanted)
                response = conn.getresponse()
            except ssl.SSLCertVerificationError as error:
                conn.close()
                raise NetworkFailure(f"TLS certificate not trusted: {error.verify_message}") \
                    from None
            except (OSError, http.client.HTTPException) as error:
                conn.close()
                if reused and isinstance(error, (http.client.RemoteDisconnected,
                                                 ConnectionResetError, BrokenPipeError)):
                    continue  # the server had closed the kept-alive connection: resend now
                self.retry_or_raise(attempt, NetworkFailure(_describe(error)))
                attempt += 1
                continue
            if response.status < 300:
                return response, conn, attempt
            try:
                detail = _error_message(response.read(64 * 1024))
            except (OSError, http.client.HTTPException):
                detail = ""
            self.finish(response, conn)
            code = response.getheader("x-ms-error-code", "") or ""
            failure = ServiceFailure(response.status, code, detail)
            if response.status not in _RETRIED_STATUS:
                raise failure
            self.retry_or_raise(attempt, failure)
            attempt += 1

    def call(self, method: str, path: str, query: Mapping[str, str] | None = None,
             headers: Mapping[str, str] | None = None,
             body: bytes | bytearray | None = None) -> Response:
        """One request whose whole (small) reply is read."""
        attempt = 0
        while True:
            response, conn, attempt = self.send(method, path, query, headers, body,
                                                attempts_used=attempt)
            try:
                data = response.read()
            except (OSError, http.client.HTTPException) as error:
                conn.close()
                self.retry_or_raise(attempt, NetworkFailure(_describe(error)))
                attempt += 1
                continue
            self.finish(response, conn)
            return Response(response.status, _headers(response), data)

    def finish(self, response: http.client.HTTPResponse,
               conn: http.client.HTTPConnection) -> None:
        """Keep ``conn`` for the next request if ``response`` was read to its end, else close
        it."""
        if response.isclosed() and not response.will_close:
            self.release(conn)
        else:
            conn.close()


def _headers(response: http.client.HTTPResponse) -> dict[str, str]:
    return {k.lower(): v for k, v in response.getheaders()}


def metadata_of(headers: Mapping[str, str]) -> dict[str, str]:
    """The blob metadata carried by ``x-ms-meta-*`` response headers."""
    return {k[len(_META):]: v for k, v in headers.items() if k.startswith(_META)}


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {' '.join(text.split())[:200]}"


def _error_message(body: bytes) -> str:
    """The <Message> of an error reply's XML, first line only (never a query string)."""
    start = body.find(b"<Message>")
    end = body.find(b"</Message>")
    if start < 0 or end < start:
        return ""
    text = body[start + 9:end].decode("utf-8", "replace").split("\n", 1)[0]
    return text.split("?", 1)[0][:200]


class Download:
    """One blob's body, streamed from the socket; a read cut mid-body resumes with a ranged GET
    (``x-ms-range``) that must match the first response's ETag, within the retry budget; what
    still fails raises :class:`NetworkFailure` (or :class:`ServiceFailure`)."""

    def __init__(self, client: Client, path: str, response: http.client.HTTPResponse,
                 conn: http.client.HTTPConnection, attempts: int, size: int) -> None:
        self._client = client
        self._path = path
        self._response: http.client.HTTPResponse | None = response
        self._conn: http.client.HTTPConnection | None = conn
        self._attempts = attempts
        self._etag = response.getheader("ETag") or ""
        self.size = size
        self.delivered = 0

    def read(self, n: int) -> bytes:
        while self.delivered < self.size:
            if self._response is None:
                self._resume()
            assert self._response is not None and self._conn is not None
            try:
                self._client.arm(self._conn)
            except NetworkFailure:
                self._drop()
                raise
            try:
                data = self._response.read(min(n, self.size - self.delivered))
            except (OSError, http.client.HTTPException) as error:
                self._drop()
                self._count(error)
                continue
            if not data:
                self._drop()
                self._count(EOFError("the connection closed before the end of the blob"))
                continue
            self.delivered += len(data)
            if self.delivered == self.size:
                self._done()
            return data
        self._done()
        return b""

    def _count(self, error: BaseException) -> None:
        self._client.retry_or_raise(self._attempts, NetworkFailure(
            f"{_describe(error)} after {self.delivered} of {self.size} bytes"))
        self._attempts += 1

    def _resume(self) -> None:
        headers = {"x-ms-range": f"bytes={self.delivered}-{self.size - 1}"}
        if self._etag:
            headers["If-Match"] = self._etag
        try:
            response, conn, self._attempts = self._client.send(
                "GET", self._path, headers=headers, attempts_used=self._attempts)
        except ServiceFailure as failure:
            if failure.status in (404, 412):
                raise ObjectChanged(f"the object vanished or changed while it was read "
                                    f"(HTTP {failure.status} {failure.code})".strip()) from None
            raise
        if response.status != 206:
            response.close()
            conn.close()
            raise NetworkFailure(f"a ranged GET to resume the download got {response.status}")
        self._response, self._conn = response, conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._response = self._conn = None

    def _done(self) -> None:
        if self._response is not None and self._conn is not None:
            self._response.read()  # (nothing left: lets the connection be reused)
            self._client.finish(self._response, self._conn)
        self._response = self._conn = None

    def close(self) -> None:
        if self._response is not None and self.delivered < self.size:
            self._drop()  # an unread body: the connection cannot be reused
        self._done()


def size_of(response: http.client.HTTPResponse) -> int:
    """The blob's full size from a Get Blob response (200, or 206 with Content-Range)."""
    ranged = response.getheader("Content-Range")
    if ranged and "/" in ranged:
        return int(ranged.rsplit("/", 1)[1])
    return int(response.getheader("Content-Length") or 0)


def listing_page(body: bytes) -> tuple[list[tuple[str, int, dict[str, str], float | None]], str]:
    """(blobs as (name, size, metadata, modified), next marker) of one List Blobs reply."""
    from xml.etree import ElementTree

    root = ElementTree.fromstring(body)
    blobs = []
    for blob in root.iterfind("Blobs/Blob"):
        name = blob.findtext("Name") or ""
        props = blob.find("Properties")
        size = int((props.findtext("Content-Length") if props is not None else None) or 0)
        modified = parse_http_date(props.findtext("Last-Modified")) if props is not None \
            else None
        meta = {child.tag: child.text or "" for child in blob.iterfind("Metadata/*")}
        blobs.append((name, size, meta, modified))
    return blobs, root.findtext("NextMarker") or ""


def metadata_headers(metadata: Mapping[str, str]) -> dict[str, str]:
    """``x-ms-meta-*`` request headers for ``metadata``."""
    return {f"{_META}{k}": v for k, v in metadata.items()}


__all__ = ["Client", "Download", "Endpoint", "NetworkFailure", "ObjectChanged", "Response",
           "ServiceFailure", "TokenFailure",
           "endpoint_from", "http_date", "listing_page", "metadata_headers", "metadata_of",
           "parse_http_date", "size_of"]
