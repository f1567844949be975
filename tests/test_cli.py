"""The command line keeps PostgreSQL's exit-status contract, run in-process through the entry
point exactly as the console script runs it."""

from __future__ import annotations

import os
import sys

import pytest

from walship.codec.keys import EncryptionKey
from walship.entry import main
from walship.errors import ExitStatus

SEG = "000000010000000000000001"


@pytest.fixture
def repo(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    root.mkdir()
    for var in list(os.environ):
        if var.startswith(("WALSHIP_", "AZURE_")):
            monkeypatch.delenv(var)
    monkeypatch.setenv("WALSHIP_REPO", f"file://{root}")
    monkeypatch.setenv("WALSHIP_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    return root


@pytest.fixture
def wal_file(tmp_path):
    path = tmp_path / "pg_wal" / SEG
    path.parent.mkdir()
    path.write_bytes(os.urandom(1000) + bytes((1 << 20) - 1000))
    return path


def test_push_then_fetch(repo, wal_file, tmp_path, capsys):
    assert main(["wal-push", str(wal_file)]) == 0
    assert main(["wal-push", str(wal_file)]) == 0  # identical again
    assert main(["wal-fetch", SEG, str(tmp_path / "out")]) == 0
    assert (tmp_path / "out").read_bytes() == wal_file.read_bytes()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"walship: wal-push {SEG} stored in=1048576 out=")
    assert "already stored, identical" in err[1]
    assert err[2].startswith(f"walship: wal-fetch {SEG} delivered")


def test_fetch_missing_is_1_and_says_so(repo, wal_file, tmp_path, capsys):
    assert main(["wal-push", str(wal_file)]) == 0
    assert main(["wal-fetch", "00000002.history", str(tmp_path / "out")]) == 1
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["wal-fetch"],  # missing arguments
    ["wal-fetch", "RECOVERYXLOG", "x"],  # not a WAL name
    ["wal-fetch", SEG, "x", "extra"],
    ["--compression-level", "99", "wal-fetch", SEG, "x"],
    ["--bogus-flag", "wal-fetch", SEG, "x"],
])
def test_fetch_usage_errors_abort_recovery(repo, argv, capsys):
    assert main(argv) >= 126
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ERROR" in err


def test_fetch_without_repository_configured_aborts_recovery(repo, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WALSHIP_REPO")
    assert main(["wal-fetch", SEG, str(tmp_path / "x")]) == ExitStatus.RECOVERY_USAGE
    assert "no repository is configured" in capsys.readouterr().err


def test_fetch_from_missing_directory_aborts_recovery(repo, monkeypatch, tmp_path):
    monkeypatch.setenv("WALSHIP_REPO", f"file://{tmp_path}/unmounted")
    assert main(["wal-fetch", SEG, str(tmp_path / "x")]) == ExitStatus.RECOVERY_UNAVAILABLE


def test_fetch_from_empty_repository_aborts_recovery(repo, tmp_path):
    assert main(["wal-fetch", SEG, str(tmp_path / "x")]) == ExitStatus.RECOVERY_UNAVAILABLE


def test_corrupt_object_aborts_recovery_and_writes_nothing(repo, wal_file, tmp_path):
    assert main(["wal-push", str(wal_file)]) == 0
    stored = repo / "wal" / SEG
    body = bytearray(stored.read_bytes())
    body[len(body) // 3] ^= 0x01
    stored.write_bytes(bytes(body))
    assert main(["wal-fetch", SEG, str(tmp_path / "out")]) == ExitStatus.RECOVERY_INTEGRITY
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_wrong_key_aborts_recovery(repo, wal_file, tmp_path, monkeypatch):
    key1, key2 = tmp_path / "k1", tmp_path / "k2"
    for key in (key1, key2):
        assert main(["keygen", "--output", str(key)]) == 0
    assert key1.read_text() != key2.read_text()
    monkeypatch.setenv("WALSHIP_ENCRYPTION_KEY_FILE", str(key1))
    assert main(["wal-push", str(wal_file)]) == 0
    assert main(["wal-fetch", SEG, str(tmp_path / "ok")]) == 0
    monkeypatch.setenv("WALSHIP_ENCRYPTION_KEY_FILE", str(key2))
    assert main(["wal-fetch", SEG, str(tmp_path / "out")]) == ExitStatus.RECOVERY_INTEGRITY
    monkeypatch.setenv("WALSHIP_ENCRYPTION_KEY_FILE", str(tmp_path / "missing-key"))
    assert main(["wal-fetch", SEG, str(tmp_path / "out")]) == ExitStatus.RECOVERY_USAGE
    assert not (tmp_path / "out").exists()


def test_conflicting_push_exits_3_and_keeps_original(repo, wal_file, tmp_path, capsys):
    assert main(["wal-push", str(wal_file)]) == 0
    original = wal_file.read_bytes()
    wal_file.write_bytes(os.urandom(1 << 20))
    assert main(["wal-push", str(wal_file)]) == ExitStatus.CONFLICT
    assert "DIFFERENT content" in capsys.readouterr().err
    assert main(["wal-fetch", SEG, str(tmp_path / "out")]) == 0
    assert (tmp_path / "out").read_bytes() == original


def test_push_failures_stay_below_126(repo, tmp_path, monkeypatch):
    assert main(["wal-push", str(tmp_path / SEG)]) == ExitStatus.USAGE  # no such file
    monkeypatch.setenv("WALSHIP_REPO", f"file://{tmp_path}/unmounted")
    path = tmp_path / SEG
    path.write_bytes(bytes(1 << 20))
    assert main(["wal-push", str(path)]) == ExitStatus.UNAVAILABLE


def test_broken_installation_never_says_not_found(repo, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "walship.cli", None)  # import fails
    assert main(["wal-fetch", SEG, str(tmp_path / "x")]) == ExitStatus.RECOVERY_FAILED
    assert main(["wal-push", str(tmp_path / "x")]) == ExitStatus.FAILED


def test_internal_error_in_fetch_aborts_recovery(repo, monkeypatch, tmp_path, capsys):
    from walship import archive

    def boom(*args, **kwargs):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(archive.Archive, "fetch_wal", boom)
    assert main(["wal-fetch", SEG, str(tmp_path / "x")]) == ExitStatus.RECOVERY_FAILED
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError" in err and "Traceback" not in err
    assert main(["--debug", "wal-fetch", SEG, str(tmp_path / "x")]) == ExitStatus.RECOVERY_FAILED
    assert "Traceback" in capsys.readouterr().err


def test_check_masks_secrets(repo, monkeypatch, capsys):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "AccountKey=TOPSECRET123")
    assert main(["check"]) == 0
    out = capsys.readouterr()
    assert "TOPSECRET123" not in out.out + out.err
    assert "reachable" in out.out


def test_check_shows_the_marker_and_a_key_it_refuses(repo, wal_file, tmp_path, monkeypatch,
                                                     capsys):
    assert main(["check"]) == 0
    assert "marker: none yet" in capsys.readouterr().out
    assert main(["wal-push", str(wal_file)]) == 0
    assert main(["check"]) == 0
    assert "marker: not encrypted, WAL segments of 1048576 bytes\n" in capsys.readouterr().out
    key = tmp_path / "key"
    key.write_text(EncryptionKey.generate().to_text())
    key.chmod(0o600)
    monkeypatch.setenv("WALSHIP_ENCRYPTION_KEY_FILE", str(key))
    assert main(["check"]) == 3
    assert "the configured key DIFFERS" in capsys.readouterr().out


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    assert main(["--version"]) == 0
    assert main(["wal-fetch", "--help"]) == 0
    assert "restore_command" in capsys.readouterr().out


def test_unreachable_azure_aborts_recovery_within_bounded_time(repo, monkeypatch, tmp_path,
                                                               capsys):
    import socket
    import time

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("WALSHIP_REPO", "azure://archive/cluster1")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                       "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
                       "AccountKey=c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0;"
                       f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")
    monkeypatch.setenv("WALSHIP_STORAGE_RETRIES", "2")
    monkeypatch.setenv("WALSHIP_STORAGE_TIMEOUT", "2")
    started = time.monotonic()
    status = main(["wal-fetch", SEG, str(tmp_path / "out")])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert status == ExitStatus.RECOVERY_UNAVAILABLE, err
    assert elapsed < 30, elapsed
    assert "c2VjcmV0" not in err and not (tmp_path / "out").exists()


# -- secrets are never printed; bad input is one line and exit 2 --------------------------------
SECRET = "S3CRETSIG"


@pytest.mark.parametrize("env,status", [
    ({"WALSHIP_REPO": f"file://user:pa55word@host/x?sig={SECRET}"}, ExitStatus.USAGE),
    ({"WALSHIP_REPO": f"https://user:pa55word@host/x?sv=1&sig={SECRET}"}, ExitStatus.USAGE),
    ({"WALSHIP_REPO": "azure://archive/c1", "AZURE_STORAGE_ACCOUNT_URL":
      f"http://user:pa55word@127.0.0.1:9/devstoreaccount1?sv=1&sig={SECRET}"}, ExitStatus.USAGE),
    ({"AZURE_STORAGE_ACCOUNT_URL": f"https://acct.blob.core.windows.net/?sv=1&sig={SECRET}",
      "AZURE_STORAGE_SAS_TOKEN": f"sv=1&sig={SECRET}"}, ExitStatus.OK),
    ({"AZURE_STORAGE_CONNECTION_STRING": "BlobEndpoint=https://acct.blob.core.windows.net/;"
      f"SharedAccessSignature=sv=1&sig={SECRET}"}, ExitStatus.OK),
])
def test_check_never_prints_a_url_secret(repo, monkeypatch, capsys, env, status):
    """User-info and query strings (SAS tokens) of every URL check prints are masked, in the
    settings it lists and in its errors alike."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["check"]) == status
    out = capsys.readouterr()
    shown = out.out + out.err
    assert SECRET not in shown and "pa55word" not in shown and "sig=" not in shown
    assert "Traceback" not in shown and out.err.count("\n") == (status != 0)
    if "AZURE_STORAGE_ACCOUNT_URL" in env or "://user" in env.get("WALSHIP_REPO", ""):
        assert "<redacted>" in shown


def test_keygen_output_is_private_and_never_overwrites(repo, tmp_path, capsys):
    key = tmp_path / "key"
    assert main(["keygen", "--output", str(key)]) == 0
    assert key.stat().st_mode & 0o777 == 0o600
    first = key.read_bytes()
    assert first.startswith(b"walship-key-v1:") and first.decode().strip() not in \
        capsys.readouterr().err
    assert main(["keygen", "--output", str(key)]) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err
    assert key.read_bytes() == first and key.stat().st_mode & 0o777 == 0o600
    target = tmp_path / "elsewhere"
    (tmp_path / "link").symlink_to(target)  # never followed, not even to a new file
    assert main(["keygen", "--output", str(tmp_path / "link")]) == ExitStatus.USAGE
    assert not target.exists()
    assert main(["keygen", "--output", str(tmp_path / "no" / "dir" / "key")]) == ExitStatus.USAGE
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("redirect", [">&-", ">/dev/full"])
def test_keygen_to_a_closed_or_full_stdout_is_one_line(redirect):
    import subprocess
    from pathlib import Path

    source = Path(__file__).resolve().parents[1]
    done = subprocess.run(["sh", "-c", f'exec "$0" -m walship keygen {redirect}',
                           sys.executable], stderr=subprocess.PIPE, text=True, cwd=source,
                          timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(source)})
    assert done.returncode == ExitStatus.USAGE, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("walship: keygen: ERROR: cannot write the key")
    assert "--output" in done.stderr


def test_a_key_file_others_can_read_is_refused(repo, wal_file, tmp_path, capsys):
    key = tmp_path / "key"
    assert main(["keygen", "--output", str(key)]) == 0
    capsys.readouterr()
    os.chmod(key, 0o644)
    os.environ["WALSHIP_ENCRYPTION_KEY_FILE"] = str(key)
    try:
        assert main(["wal-push", str(wal_file)]) == ExitStatus.USAGE
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not private" in err and f"chmod 600 {key}" in err
        assert main(["wal-fetch", SEG, str(tmp_path / "out")]) == ExitStatus.RECOVERY_USAGE
        os.chmod(key, 0o600)
        assert main(["wal-push", str(wal_file)]) == 0
    finally:
        del os.environ["WALSHIP_ENCRYPTION_KEY_FILE"]


@pytest.mark.parametrize("mode,warned", [(0o644, True), (0o604, True), (0o600, False)])
def test_a_config_file_others_can_read_warns_when_it_holds_a_secret(repo, tmp_path, monkeypatch,
                                                                  capsys, mode, warned):
    conf = tmp_path / "walship.toml"
    conf.write_text(f'[azure]\nsas_token = "sv=1&sig={SECRET}"\n')
    os.chmod(conf, mode)
    monkeypatch.setenv("WALSHIP_CONFIG", str(conf))
    assert main(["check"]) == 0  # a warning, never a failure
    err = capsys.readouterr().err
    assert SECRET not in err
    if warned:
        assert err.count("\n") == 1 and err.startswith("walship: WARNING: config file ")
        assert "azure.sas_token" in err and f"chmod 600 {conf}" in err
    else:
        assert err == ""
    conf.write_text('storage_retries = 2\n')  # no secret in it: nothing to say
    os.chmod(conf, 0o644)
    assert main(["check"]) == 0 and capsys.readouterr().err == ""


@pytest.mark.parametrize("text,env", [
    (b"storage_timeout = true\n", {}),
    (b"push_ahead = 3.7\n", {}),
    (b"storage_timeout = nan\n", {}),
    (b"storage_timeout = inf\n", {}),
    (b"push_ahead = inf\n", {}),
    (b"prefetch = -nan\n", {}),
    (b"log_level = 1\n", {}),
    (b"[azure]\naccount = 5\n", {}),
    (b"repo = \"file:///x\xff\"\n", {}),  # not UTF-8
    (b"", {"WALSHIP_STORAGE_TIMEOUT": "inf"}),
    (b"", {"WALSHIP_STORAGE_TIMEOUT": "nan"}),
    (b"", {"WALSHIP_PUSH_AHEAD": "inf"}),
])
def test_bad_settings_are_one_line_and_exit_2(repo, tmp_path, monkeypatch, capsys, text, env):
    conf = tmp_path / "walship.toml"
    conf.write_bytes(text)
    monkeypatch.setenv("WALSHIP_CONFIG", str(conf))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["check"]) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("ERROR: invalid" in err or "not valid TOML" in err), err
    assert "internal error" not in err


def test_a_repository_that_is_a_file_says_so(repo, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WALSHIP_REPO", "file:///etc/passwd")
    assert main(["check"]) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert "/etc/passwd is a regular file" in err and "does not exist" not in err
    assert main(["wal-fetch", SEG, str(tmp_path / "out")]) == ExitStatus.RECOVERY_USAGE
    assert "not a directory" in capsys.readouterr().err


def test_help_shows_the_real_compression_default(capsys):
    from walship.codec import DEFAULT_LEVEL

    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"WALSHIP_COMPRESSION_LEVEL; default {DEFAULT_LEVEL}]" in out


def test_an_unexpected_error_quoting_a_sas_url_is_masked(repo, monkeypatch, tmp_path, capsys):
    from walship import archive

    def boom(*args, **kwargs):
        raise RuntimeError(f"GET https://a.blob.core.windows.net/c/x?sv=1&sig={SECRET} failed")

    monkeypatch.setattr(archive.Archive, "fetch_wal", boom)
    assert main(["wal-fetch", SEG, str(tmp_path / "x")]) == ExitStatus.RECOVERY_FAILED
    err = capsys.readouterr().err
    assert "internal error: RuntimeError" in err and SECRET not in err
    assert "https://a.blob.core.windows.net/c/x?<redacted>" in err


def test_a_file_url_with_a_query_is_refused_not_ignored(repo, monkeypatch, capsys):
    monkeypatch.setenv("WALSHIP_REPO", f"file://{repo}?sig={SECRET}")
    assert main(["check"]) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert "no query string" in err and SECRET not in err and err.count("\n") == 1
    monkeypatch.setenv("WALSHIP_REPO", f"file://{repo}%3Fx")  # an encoded ? is a name
    assert main(["check"]) == ExitStatus.UNAVAILABLE
    assert f"{repo}?x does not exist" in capsys.readouterr().err


# -- a standby (standby.signal in the working directory, PostgreSQL's data directory) ---------
@pytest.fixture
def standby(tmp_path, monkeypatch):
    """The working directory is a standby's data directory."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "standby.signal").touch()
    monkeypatch.chdir(data)
    return data


def test_standby_waits_for_a_missing_repository_directory(repo, standby, monkeypatch, tmp_path,
                                                         capsys):
    monkeypatch.setenv("WALSHIP_REPO", f"file://{tmp_path}/unmounted")
    assert main(["wal-fetch", SEG, str(standby / "x")]) == ExitStatus.NOT_FOUND
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one loud line
    assert f"walship: wal-fetch {SEG}: WARNING: repository directory" in err, err
    assert "standby.signal" in err and "not available yet" in err and "ERROR" not in err
    assert not (standby / "x").exists()


def test_standby_waits_for_an_empty_repository(repo, standby, capsys):
    assert main(["wal-fetch", SEG, str(standby / "x")]) == ExitStatus.NOT_FOUND
    assert "WARNING: the repository" in capsys.readouterr().err


def test_standby_waits_for_unreachable_azure(repo, standby, monkeypatch, capsys):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("WALSHIP_REPO", "azure://archive/cluster1")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                       "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
                       "AccountKey=c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0;"
                       f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")
    monkeypatch.setenv("WALSHIP_STORAGE_RETRIES", "0")
    monkeypatch.setenv("WALSHIP_STORAGE_TIMEOUT", "2")
    assert main(["wal-fetch", SEG, str(standby / "out")]) == ExitStatus.NOT_FOUND
    err = capsys.readouterr().err
    assert "WARNING" in err and "c2VjcmV0" not in err and err.count("\n") == 1, err


def test_standby_still_aborts_on_integrity_keys_and_configuration(repo, standby, wal_file,
                                                                  monkeypatch, tmp_path):
    """Only an unreachable or missing repository waits: what retrying cannot mend stays
    fatal in a standby too."""
    assert main(["wal-push", str(wal_file)]) == 0
    stored = repo / "wal" / SEG
    original = stored.read_bytes()
    body = bytearray(original)
    body[len(body) // 3] ^= 0x01
    stored.write_bytes(bytes(body))
    assert main(["wal-fetch", SEG, str(standby / "out")]) == ExitStatus.RECOVERY_INTEGRITY
    stored.write_bytes(original)
    monkeypatch.setenv("WALSHIP_ENCRYPTION_KEY_FILE", str(tmp_path / "missing-key"))
    assert main(["wal-fetch", SEG, str(standby / "out")]) == ExitStatus.RECOVERY_USAGE
    monkeypatch.delenv("WALSHIP_ENCRYPTION_KEY_FILE")
    monkeypatch.delenv("WALSHIP_REPO")
    assert main(["wal-fetch", SEG, str(standby / "out")]) == ExitStatus.RECOVERY_USAGE
    assert main(["wal-fetch", "RECOVERYXLOG", "x"]) == ExitStatus.RECOVERY_USAGE
    assert not (standby / "out").exists()


@pytest.mark.parametrize("error", ["permission", "authentication", "bug"])
def test_standby_still_aborts_on_permanent_storage_failures_and_bugs(repo, standby,
                                                                     monkeypatch, error):
    from walship import archive
    from walship.errors import StorageError

    def fail(*args, **kwargs):
        if error == "bug":
            raise ZeroDivisionError("bug")
        raise StorageError("cannot read wal/" + SEG, f"{error} denied")

    monkeypatch.setattr(archive.Archive, "fetch_wal", fail)
    assert main(["wal-fetch", SEG, str(standby / "x")]) == ExitStatus.RECOVERY_FAILED


def test_archive_recovery_still_aborts_on_a_missing_repository(repo, tmp_path, monkeypatch):
    """recovery.signal, no standby.signal: 1 could end recovery early and promote."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "recovery.signal").touch()
    monkeypatch.chdir(data)
    monkeypatch.setenv("WALSHIP_REPO", f"file://{tmp_path}/unmounted")
    assert main(["wal-fetch", SEG, str(data / "x")]) == ExitStatus.RECOVERY_UNAVAILABLE


def test_standby_push_to_a_missing_repository_is_still_a_failure(repo, standby, monkeypatch,
                                                                 tmp_path):
    monkeypatch.setenv("WALSHIP_REPO", f"file://{tmp_path}/unmounted")
    path = tmp_path / SEG
    path.write_bytes(bytes(1 << 20))
    assert main(["wal-push", str(path)]) == ExitStatus.UNAVAILABLE
