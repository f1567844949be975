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
