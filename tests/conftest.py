"""Test-wide fixtures: real services (Azurite, PostgreSQL) started as local processes."""

import os
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.azurite",
    "tests.fixtures.postgres",
]


@pytest.fixture
def file_repo_env(tmp_path, monkeypatch) -> Path:
    """An empty file:// repository, named by WALSHIP_REPO in an environment cleaned of any
    other walship, Azure or libpq setting, so that in-process CLI calls use it alone."""
    root = tmp_path / "repo"
    root.mkdir()
    for var in list(os.environ):
        if var.startswith(("WALSHIP_", "AZURE_", "PG")):
            monkeypatch.delenv(var)
    monkeypatch.setenv("WALSHIP_REPO", f"file://{root}")
    monkeypatch.setenv("WALSHIP_CONFIG", os.devnull)
    return root
