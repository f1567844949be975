"""Settings precedence (flags > environment > file) and validation."""

from __future__ import annotations

import pytest

from walship.config import load_settings, setting_names
from walship.errors import ConfigError


def test_flags_beat_environment_beat_file(tmp_path):
    conf = tmp_path / "walship.toml"
    conf.write_text('repo = "file:///from/file"\ncompression_level = 5\nstorage_retries = 7\n'
                    '[azure]\naccount = "fileaccount"\n')
    env = {"WALSHIP_REPO": "file:///from/env", "WALSHIP_COMPRESSION_LEVEL": "9"}
    s = load_settings({"repo": "file:///from/flag"}, env, str(conf))
    assert (s.repo, s.compression_level, s.storage_retries) == ("file:///from/flag", 9, 7)
    assert s.azure.account == "fileaccount"
    assert s.sources["repo"] == "--repo" and s.sources["compression_level"] == \
        "WALSHIP_COMPRESSION_LEVEL"
    s = load_settings({}, env, str(conf))
    assert s.repo == "file:///from/env"
    s = load_settings({}, {"WALSHIP_CONFIG": str(conf)})
    assert s.repo == "file:///from/file" and s.compression_level == 5


def test_defaults():
    s = load_settings({}, {})
    assert s.repo is None and s.compression_level == 1 and s.storage_retries == 4
    with pytest.raises(ConfigError, match="no repository"):
        s.require_repo()


@pytest.mark.parametrize("text,match", [
    ("repo = 1\nbogus = 2\n", "unknown settings: bogus"),
    ("[azure]\nkey = 'x'\n", "azure.key"),
    ("compression_level = 30\n", "compression_level"),
    ("storage_timeout = 'soon'\n", "storage_timeout"),
    ("azure_transport = 'http2'\n", "azure_transport"),
    ("repo = [", "not valid TOML"),
])
def test_bad_files_are_refused_in_one_line(tmp_path, text, match):
    conf = tmp_path / "c.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_settings({}, {}, str(conf))
    assert "\n" not in info.value.one_line()


def test_the_azure_transport_reaches_the_storage_options():
    assert load_settings({}, {}).storage_options().azure_transport == "auto"
    chosen = load_settings({}, {"WALSHIP_AZURE_TRANSPORT": "sdk"})
    assert chosen.storage_options().azure_transport == "sdk"


def test_missing_explicit_file_is_an_error():
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings({}, {"WALSHIP_CONFIG": "/nonexistent/walship.toml"})


def test_secrets_are_masked():
    secret = "AccountKey=SUPERSECRETVALUE"
    s = load_settings({}, {"AZURE_STORAGE_CONNECTION_STRING": secret,
                           "AZURE_STORAGE_KEY": "SUPERSECRETKEY"})
    shown = repr(s) + str(s.describe())
    assert "SUPERSECRET" not in shown
    assert ("azure.connection_string", "****", "AZURE_STORAGE_CONNECTION_STRING") in s.describe()


def test_every_setting_is_documented():
    readme = (__import__("pathlib").Path(__file__).parents[1] / "README.md").read_text()
    for name in setting_names():
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize("text,match", [
    ("storage_timeout = true\n", "it must be a number, not a boolean"),
    ("push_ahead = 3.7\n", "it must be a whole number, not a fraction"),
    ("compression_level = 2.0\n", "whole number"),
    ("storage_timeout = nan\n", "finite"),
    ("storage_timeout = -inf\n", "finite"),
    ("cache_max_mb = inf\n", "whole number"),
    ("repo = 5\n", "it must be text"),
    ("[azure]\naccount_key = 12\n", "azure.account_key"),
])
def test_file_values_must_have_their_type(tmp_path, text, match):
    conf = tmp_path / "c.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_settings({}, {}, str(conf))
    assert "\n" not in info.value.one_line()


def test_whole_numbers_are_numbers_and_text_is_parsed():
    s = load_settings({}, {"WALSHIP_STORAGE_TIMEOUT": "2.5", "WALSHIP_PUSH_AHEAD": "3"})
    assert (s.storage_timeout, s.push_ahead) == (2.5, 3)


@pytest.mark.parametrize("variable,value", [
    ("WALSHIP_STORAGE_TIMEOUT", "inf"), ("WALSHIP_STORAGE_TIMEOUT", "nan"),
    ("WALSHIP_PUSH_AHEAD", "inf"), ("WALSHIP_CACHE_MAX_MB", "nan"),
])
def test_nan_and_inf_are_refused_from_the_environment(variable, value):
    with pytest.raises(ConfigError, match=variable):
        load_settings({}, {variable: value})


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_bytes(b'repo = "file:///caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_settings({}, {}, str(conf))
    assert "0xe9" in info.value.why


def test_the_compression_hint_names_the_real_default(tmp_path):
    from walship.codec import DEFAULT_LEVEL

    with pytest.raises(ConfigError) as info:
        load_settings({}, {"WALSHIP_COMPRESSION_LEVEL": "0"})
    assert info.value.hint == f"{DEFAULT_LEVEL} is the default"


def test_urls_are_shown_without_user_info_or_query():
    s = load_settings({}, {"WALSHIP_REPO": "file://u:pw@host/x?sig=SECRET",
                           "AZURE_STORAGE_ACCOUNT_URL": "https://a.blob.core.windows.net/?sig=SEC"})
    shown = {name: value for name, value, _ in s.describe()}
    assert shown["repo"] == "file://<redacted>@host/x?<redacted>"
    assert shown["azure.account_url"] == "https://a.blob.core.windows.net/?<redacted>"


@pytest.mark.parametrize("mode,secret,warned", [
    (0o644, True, True), (0o640, True, None), (0o600, True, False), (0o644, False, False),
])
def test_a_secret_in_a_file_others_can_read_is_warned_about(tmp_path, mode, secret, warned):
    import os

    conf = tmp_path / "c.toml"
    conf.write_text('[azure]\naccount = "acct"\n' + ('account_key = "S3CRET"\n' if secret else ""))
    os.chmod(conf, mode)
    s = load_settings({}, {}, str(conf))
    if warned is None:  # 0640: private enough when root owns it, and only then
        warned = os.stat(conf).st_uid != 0
    assert bool(s.warnings) == warned
    if warned:
        assert "azure.account_key" in s.warnings[0] and "S3CRET" not in s.warnings[0]
