"""What the Azure backend asks of the service, beyond the contract every backend meets, and how
it picks its transport (REST, or the SDK)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from walship.errors import ConfigError, Unavailable
from walship.storage import AzureCredentials, StorageOptions, azure_rest
from walship.storage.azure import AzureStorage


def _limited_listing_requests(backend, monkeypatch) -> tuple[list[dict], list[dict]]:
    """(page sizes asked for by ``list(limit=1)``, and by a full ``list``)."""
    asked: list[dict] = []
    if backend._rest is not None:
        real = backend._rest.call

        def call(method, path, query=None, **kwargs):
            asked.append(dict(query or {}))
            return real(method, path, query, **kwargs)

        monkeypatch.setattr(backend._rest, "call", call)
        size = "maxresults"
    else:
        real_list = backend._container.list_blobs

        def list_blobs(**kwargs):
            asked.append(kwargs)
            return real_list(**kwargs)

        monkeypatch.setattr(backend._container, "list_blobs", list_blobs)
        size = "results_per_page"
    limited = [i.key for i in backend.list("wal/", limit=1)]
    first = [a.get(size) for a in asked]
    asked.clear()
    everything = [i.key for i in backend.list("wal/")]
    return (limited, first), (everything, [a.get(size) for a in asked])


@pytest.mark.parametrize("transport", ["auto", "sdk"])
def test_a_limited_listing_asks_for_no_more_than_its_limit(azure_repository, monkeypatch,
                                                           transport):
    """Whether a repository holds any WAL is one request for one entry, however much it
    holds (a full page is up to 5000 entries with their metadata)."""
    backend = azure_repository.open(transport)
    assert (backend._rest is not None) == (transport == "auto")
    for n in range(1, 4):
        backend.put(f"wal/{n:024X}", [b"x"])
    (limited, sizes), (everything, full_sizes) = _limited_listing_requests(backend, monkeypatch)
    assert limited == [f"wal/{1:024X}"]
    assert sizes == [1] if transport == "sdk" else sizes == ["1"]
    assert len(everything) == 3
    assert full_sizes == [None]


def test_the_transport_follows_the_credentials(monkeypatch):
    """REST for a key, a SAS token or an OAuth token over HTTPS; the SDK for a proxy, and when
    asked."""
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    key = "a2V5"  # base64 of "key"

    def transport(creds: AzureCredentials, choice: str = "auto") -> str:
        backend = AzureStorage("azure://box/p", StorageOptions(azure=creds,
                                                               azure_transport=choice))
        try:
            return "rest" if backend._rest is not None else "sdk"
        finally:
            backend.close()

    shared = AzureCredentials(account="acct", account_key=key)
    sas = AzureCredentials(account="acct", sas_token="sv=2021&sig=abc")
    string = AzureCredentials(connection_string="DefaultEndpointsProtocol=https;AccountName="
                              f"acct;AccountKey={key};EndpointSuffix=core.windows.net")
    assert transport(shared) == transport(sas) == transport(string) == "rest"
    assert transport(shared, "sdk") == "sdk"
    assert transport(AzureCredentials(account="acct")) == "rest"  # DefaultAzureCredential
    with pytest.raises(ConfigError, match="only sent over https"):  # never a token in clear
        transport(AzureCredentials(account_url="http://127.0.0.1:1/acct"))
    assert transport(AzureCredentials(connection_string="UseDevelopmentStorage=true")) == "sdk"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert transport(shared) == "sdk"


def test_endpoints_of_connection_strings():
    key = "a2V5"
    public = azure_rest.endpoint_from(
        "connection_string", connection_string=f"AccountName=acct;AccountKey={key}")
    assert public is not None
    assert (public.scheme, public.host, public.port, public.base_path, public.account,
            public.key) == ("https", "acct.blob.core.windows.net", None, "", "acct", b"key")
    emulator = azure_rest.endpoint_from(
        "connection_string", connection_string="DefaultEndpointsProtocol=http;AccountName=dev;"
        f"AccountKey={key};BlobEndpoint=http://127.0.0.1:10000/dev;")
    assert emulator is not None
    assert (emulator.host, emulator.port, emulator.base_path) == ("127.0.0.1", 10000, "/dev")
    assert "key" not in repr(emulator) and "a2V5" not in repr(emulator)
    assert azure_rest.endpoint_from("connection_string",
                                    connection_string="AccountName=acct;AccountKey=not base64!"
                                    ) is None


def test_http_dates_match_the_standard_library():
    from email.utils import formatdate

    for when in (0.0, 951782400.0, 951868799.0, 1795665600.0, 1798761599.0, 4107542400.0):
        assert azure_rest.http_date(when) == formatdate(when, usegmt=True)
        assert azure_rest.parse_http_date(azure_rest.http_date(when)) == when
    assert azure_rest.parse_http_date("garbage") is None


def _cut_after(download, nbytes: int) -> None:
    """Make the first response of ``download`` fail after ``nbytes`` bytes, as a dropped
    connection does."""
    body = download._body
    response = body._response
    real = response.read
    state = {"sent": 0}

    def read(n=-1):
        if state["sent"] >= nbytes:
            raise ConnectionResetError("connection reset by peer (test)")
        data = real(min(n, nbytes - state["sent"]))
        state["sent"] += len(data)
        return data

    response.read = read


def test_a_download_cut_midway_resumes_where_it_stopped(azure_repository, monkeypatch):
    monkeypatch.setattr(azure_rest, "backoff", lambda attempt: 0.0)
    backend = azure_repository.open()
    data = os.urandom(3 << 20)
    backend.put("wal/000000010000000000000001", [data])
    with backend.get("wal/000000010000000000000001") as download:
        _cut_after(download, 1 << 20)
        assert download.read() == data
        assert download._body._attempts == 1  # one retry: the resumed, ranged GET


def test_a_blob_replaced_during_a_download_fails_the_read(azure_repository, monkeypatch):
    """The resumed GET must match the first response's ETag: never half of one object and
    half of another."""
    monkeypatch.setattr(azure_rest, "backoff", lambda attempt: 0.0)
    backend = azure_repository.open()
    key = "wal/000000010000000000000002"
    backend.put(key, [os.urandom(2 << 20)])
    with backend.get(key) as download:
        first = download.read(1 << 20)
        assert len(first) == 1 << 20
        azure_repository.replace_raw(key, os.urandom(2 << 20))
        _cut_after(download, 0)
        with pytest.raises(Unavailable, match="vanished or changed while it was read"):
            download.read()


def test_a_reading_process_never_imports_the_sdk(azure_repository, tmp_path):
    """wal-fetch, its prefetch worker and backup-fetch only read: the SDK's import (140 ms
    and more) is not paid for a key or a SAS token."""
    backend = azure_repository.open()
    backend.put("wal/000000010000000000000003", [b"payload"], metadata=lambda: {"a": "b"})
    script = tmp_path / "reader.py"
    script.write_text(
        "import json, sys\n"
        "from walship.storage import open_storage, StorageOptions, AzureCredentials\n"
        "opts = StorageOptions(azure=AzureCredentials(connection_string=sys.argv[2]))\n"
        "s = open_storage(sys.argv[1], opts)\n"
        "with s.get('wal/000000010000000000000003') as d:\n"
        "    body = d.read()\n"
        "keys = [i.key for i in s.list('wal/')]\n"
        "info = s.head('wal/000000010000000000000003')\n"
        "s.close()\n"
        "print(json.dumps([body.decode(), keys, info.metadata, info.size,\n"
        "                  sorted(m for m in sys.modules if m.startswith('azure'))]))\n")
    out = subprocess.run([sys.executable, str(script), azure_repository.url,
                          azure_repository.azurite.connection_string],
                         capture_output=True, text=True, check=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if "PROXY" not in k.upper()})
    body, keys, metadata, size, modules = json.loads(out.stdout)
    assert (body, keys, metadata, size) == ("payload", ["wal/000000010000000000000003"],
                                            {"a": "b"}, 7)
    assert modules == []


@pytest.mark.parametrize("transport", ["auto", "sdk"])
def test_a_wrong_key_is_access_denied_never_not_found(azure_repository, transport):
    """The service checks every signature: a wrong key fails every request loudly (wal-fetch
    then exits above 125), and never reads as "no such object" (exit 1 would end recovery)."""
    from dataclasses import replace

    from walship.errors import NotFound, StorageError

    good = azure_repository.open()
    good.put("wal/000000010000000000000004", [b"x"])
    wrong_key = "d3Jvbmd3cm9uZ3dyb25nd3Jvbmd3cm9uZ3dyb25nd3Jvbmd3cm9uZw=="
    text = azure_repository.azurite.connection_string
    fields = dict(item.split("=", 1) for item in text.strip(";").split(";"))
    fields["AccountKey"] = wrong_key
    options = replace(azure_repository.options, azure_transport=transport,
                      azure=AzureCredentials(connection_string=";".join(
                          f"{k}={v}" for k, v in fields.items())))
    bad = AzureStorage(azure_repository.url, options)
    try:
        for attempt in (lambda: bad.get("wal/000000010000000000000004"),
                        lambda: bad.get("wal/000000010000000000000009"),
                        lambda: list(bad.list("wal/")),
                        lambda: bad.head("wal/000000010000000000000009"),
                        lambda: bad.put("wal/000000010000000000000005", [b"y"])):
            with pytest.raises(StorageError) as caught:
                attempt()
            assert not isinstance(caught.value, NotFound)
            assert "access denied" in str(caught.value) or "403" in str(caught.value)
            assert wrong_key not in str(caught.value)
    finally:
        bad.close()


class _FlakyService:
    """A local HTTP server that answers ``failures`` requests with ``status``, then 200 with
    ``body``; it counts the requests it saw."""

    def __init__(self, failures: int, status: int, body: bytes = b"data") -> None:
        import http.server
        import threading

        service = self
        self.failures, self.status, self.body, self.seen = failures, status, body, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - the http.server API
                service.seen += 1
                if service.seen <= service.failures:
                    payload = b"<?xml version='1.0'?><Error><Code>ServerBusy</Code>" \
                              b"<Message>busy?sig=SECRET</Message></Error>"
                    self.send_response(service.status)
                    self.send_header("x-ms-error-code", "ServerBusy")
                else:
                    payload = service.body
                    self.send_response(200)
                    self.send_header("x-ms-meta-walship_sha256", "sha256:x")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def storage(self, retries: int) -> AzureStorage:
        port = self.server.server_address[1]
        creds = AzureCredentials(connection_string=(
            "DefaultEndpointsProtocol=http;AccountName=acct;AccountKey=a2V5;"
            f"BlobEndpoint=http://127.0.0.1:{port}/acct;"))
        return AzureStorage("azure://box/p", StorageOptions(retries=retries, timeout=5,
                                                            azure=creds))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_busy_replies_are_retried_then_reported_unavailable(monkeypatch):
    """5xx replies are retried ``retries`` times, then the failure is Unavailable (wal-fetch
    exits above 125); the error shows no query string from the service's message."""
    monkeypatch.setattr(azure_rest, "backoff", lambda attempt: 0.0)
    flaky = _FlakyService(failures=2, status=503, body=b"payload")
    try:
        backend = flaky.storage(retries=2)
        with backend.get("wal/000000010000000000000001") as download:
            assert download.read() == b"payload"
        assert flaky.seen == 3
        backend.close()
        flaky.seen = 0
        backend = flaky.storage(retries=1)
        with pytest.raises(Unavailable, match="503") as caught:
            backend.get("wal/000000010000000000000001")
        assert flaky.seen == 2
        assert "SECRET" not in str(caught.value)
        backend.close()
    finally:
        flaky.close()


def test_a_client_error_is_not_retried(monkeypatch):
    monkeypatch.setattr(azure_rest, "backoff", lambda attempt: 0.0)
    flaky = _FlakyService(failures=5, status=400)
    try:
        backend = flaky.storage(retries=4)
        from walship.errors import StorageError

        with pytest.raises(StorageError, match="400"):
            backend.get("wal/000000010000000000000001")
        assert flaky.seen == 1
        backend.close()
    finally:
        flaky.close()


def test_check_says_which_transport_it_uses(azure_repository, monkeypatch, capsys):
    from walship.entry import main

    for name, value in azure_repository.env.items():
        monkeypatch.setenv(name, value)
    for choice, shown in (("auto", "transport: rest (connection string)"),
                          ("sdk", "transport: sdk (connection string)")):
        monkeypatch.setenv("WALSHIP_AZURE_TRANSPORT", choice)
        assert main(["check"]) == 0
        assert shown in capsys.readouterr().out


@pytest.mark.parametrize("transport", ["auto", "sdk"])
def test_a_blob_deleted_during_a_download_is_never_not_found(azure_repository, monkeypatch,
                                                             transport):
    """Found, then gone halfway (a racing deletion): the read fails as Unavailable. NotFound
    would make wal-fetch tell PostgreSQL that the archive ends here."""
    from walship.errors import NotFound
    from walship.storage import azure

    monkeypatch.setattr(azure_rest, "backoff", lambda attempt: 0.0)
    monkeypatch.setattr(azure, "SINGLE_GET_MAX", 1 << 20)  # the SDK reads in several GETs
    monkeypatch.setattr(azure, "DOWNLOAD_CHUNK", 1 << 20)
    backend = azure_repository.open(transport)
    key = "wal/000000010000000000000007"
    backend.put(key, [os.urandom(3 << 20)])
    with backend.get(key) as download:
        assert len(download.read(1 << 20)) == 1 << 20
        azure_repository.container_client().delete_blob(azure_repository.blob_name(key))
        if transport == "auto":
            _cut_after(download, 0)
        with pytest.raises(Unavailable, match="vanished or changed") as caught:
            download.read()
        assert not isinstance(caught.value, NotFound)


class _FakeIdentity:
    """Stands in for DefaultAzureCredential: hands out tokens that Azurite's ``--oauth basic``
    accepts (right audience and issuer, valid times; it does not check signatures)."""

    made: list[_FakeIdentity] = []

    def __init__(self, lifetime: float = 3600) -> None:
        self.lifetime = lifetime
        self.scopes: list[tuple[str, ...]] = []
        self.closed = False
        _FakeIdentity.made.append(self)

    def get_token(self, *scopes, **kwargs):
        import base64
        import time

        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        now = int(time.time())

        def part(value: dict) -> str:
            return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

        claims = {"aud": "https://storage.azure.com", "iss": "https://sts.windows.net/"
                  "ab1f708d-50f6-404c-a006-d71b2ac7a606/", "iat": now - 60, "nbf": now - 60,
                  "exp": now + int(self.lifetime), "oid": "test"}
        token = f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"
        return AccessToken(token, now + int(self.lifetime))

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("transport", ["auto", "sdk"])
def test_default_azure_credential_on_both_transports(azurite_oauth, monkeypatch, transport):
    """A managed identity's tokens (DefaultAzureCredential) reach Azure Storage over REST as
    over the SDK: every operation, a block upload included, one token for many requests, a
    new one before it expires, and the credential closed with the repository."""
    import azure.identity as identity_sdk
    from azure.storage.blob import ContainerClient

    from walship.storage import azure as backend_module

    monkeypatch.setattr(identity_sdk, "DefaultAzureCredential", _FakeIdentity)
    monkeypatch.setattr(azure_rest, "backoff", lambda attempt: 0.0)
    monkeypatch.setattr(backend_module, "SINGLE_PUT_MAX", 1 << 20)  # the big one: SDK blocks
    monkeypatch.setattr(backend_module, "BLOCK_SIZE", 1 << 20)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", azurite_oauth.ca_file)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    container = f"oauth-{transport}"
    with ContainerClient.from_connection_string(azurite_oauth.connection_string, container,
                                                api_version=azure_rest.API_VERSION) as client:
        if not client.exists():
            client.create_container()
    _FakeIdentity.made.clear()
    backend = AzureStorage(f"azure://{container}/p", StorageOptions(
        retries=1, timeout=5, azure=AzureCredentials(account_url=azurite_oauth.blob_endpoint),
        azure_transport=transport))
    assert backend.transport == f"{'rest' if transport == 'auto' else 'sdk'} (default)"
    small, big = os.urandom(1000), os.urandom(3 << 20)
    backend.put("wal/000000010000000000000001", [small], metadata=lambda: {"k": "v"})
    backend.put("wal/000000010000000000000002", [big])
    with backend.get("wal/000000010000000000000001") as download:
        assert download.read() == small
    with backend.get("wal/000000010000000000000002") as download:
        assert download.read() == big
    assert backend.head("wal/000000010000000000000001").metadata == {"k": "v"}
    assert [i.key for i in backend.list("wal/")] == ["wal/000000010000000000000001",
                                                     "wal/000000010000000000000002"]
    backend.delete("wal/000000010000000000000001")
    assert len(_FakeIdentity.made) == 1  # one identity, shared by both transports
    identity = _FakeIdentity.made[0]
    assert all(scopes == ("https://storage.azure.com/.default",) for scopes in identity.scopes)
    if transport == "auto":
        assert len(identity.scopes) <= 2  # (REST once, the SDK's block upload once)
        import time

        token, _ = backend._rest._bearer
        backend._rest._bearer = (token, time.time() + 100)  # within the renewal margin
        before = len(identity.scopes)
        backend.head("wal/000000010000000000000002")  # renews it
        backend.head("wal/000000010000000000000002")  # uses the new one
        assert len(identity.scopes) == before + 1
    backend.close()
    assert identity.closed


def test_a_missing_identity_is_access_denied(azurite_oauth, monkeypatch):
    """No managed identity, no az login: the failure says so, as access denied (wal-fetch
    exits above 125), not as a crash or as "not found"."""
    import azure.identity

    from walship.errors import NotFound, StorageError

    class NoIdentity(_FakeIdentity):
        def get_token(self, *scopes, **kwargs):
            raise azure.identity.CredentialUnavailableError(
                "DefaultAzureCredential failed to retrieve a token from the included "
                "credentials.\nAttempted credentials: ...")

    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", NoIdentity)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", azurite_oauth.ca_file)
    backend = AzureStorage("azure://nothing/p", StorageOptions(
        retries=0, timeout=5, azure=AzureCredentials(account_url=azurite_oauth.blob_endpoint)))
    with pytest.raises(StorageError, match="access denied: no OAuth token: "
                       "DefaultAzureCredential failed") as caught:
        backend.get("wal/000000010000000000000001")
    assert not isinstance(caught.value, NotFound)
    backend.close()


def test_connections_are_kept_alive_but_not_once_long_idle(azure_repository, monkeypatch):
    backend = azure_repository.open()
    backend.put("wal/000000010000000000000001", [b"x"])
    made = []
    real = backend._rest._connect

    def connect():
        made.append(1)
        return real()

    monkeypatch.setattr(backend._rest, "_connect", connect)
    for _ in range(3):
        backend.head("wal/000000010000000000000001")
    assert len(made) == 0  # the put's connection, kept alive
    monkeypatch.setattr(azure_rest, "IDLE_SECONDS", 0.0)
    backend.head("wal/000000010000000000000001")
    assert len(made) == 1


@pytest.mark.parametrize("transport", ["auto", "sdk"])
@pytest.mark.parametrize("credential", ["account_key", "sas_token", "connection_string"])
def test_a_credential_error_is_one_line_without_the_secret(azure_repository, monkeypatch,
                                                           capsys, tmp_path, transport,
                                                           credential):
    """A wrong key or a forged SAS token: check and wal-fetch fail with one line each, which
    names the problem and shows neither the key nor the signature."""
    import os

    from walship.entry import main
    from walship.errors import ExitStatus

    forged = "Zm9yZ2VkZm9yZ2VkZm9yZ2VkZm9yZ2VkZm9yZ2Vk"  # base64, as real keys and sigs are
    azurite = azure_repository.azurite
    azure_repository.open().put("wal/000000010000000000000001", [b"x"])
    for name in list(os.environ):
        if name.startswith(("WALSHIP_", "AZURE_")):
            monkeypatch.delenv(name)
    (tmp_path / "walship.toml").write_text("")
    env = {"WALSHIP_REPO": azure_repository.url, "WALSHIP_CONFIG": str(tmp_path / "walship.toml"),
           "WALSHIP_AZURE_TRANSPORT": transport, "WALSHIP_STORAGE_RETRIES": "1",
           "WALSHIP_PREFETCH": "0"}
    if credential == "account_key":
        env.update(AZURE_STORAGE_ACCOUNT=azurite.account, AZURE_STORAGE_KEY=forged + "==",
                   AZURE_STORAGE_ACCOUNT_URL=azurite.blob_endpoint)
    elif credential == "sas_token":
        env.update(AZURE_STORAGE_ACCOUNT_URL=azurite.blob_endpoint,
                   AZURE_STORAGE_SAS_TOKEN="sv=2021-08-06&ss=b&srt=sco&sp=rwdlac&"
                   f"se=2099-01-01T00:00:00Z&spr=https,http&sig={forged}%3D")
    else:
        env["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string.replace(
            azurite.key, forged + "==")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["check"]) == ExitStatus.FAILED
    assert main(["wal-fetch", "000000010000000000000001", str(tmp_path / "out")]) \
        == ExitStatus.RECOVERY_FAILED
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 2, out.err
    for line in lines:
        assert "ERROR" in line and "access denied" in line, line
    assert forged not in out.out + out.err and "sig=" not in out.out + out.err
    assert not (tmp_path / "out").exists()
