"""Yields one fresh, empty repository per backend for the storage contract suite."""

from __future__ import annotations

import uuid

import pytest

from walship.storage import open_storage
from walship.storage.memory import MemoryStorage


@pytest.fixture(params=["memory", "file", "azure", "azure-small-requests"])
def storage(request, tmp_path, monkeypatch):
    """``azure-small-requests``: Azure with 1 MiB thresholds, so that every object of more
    than 1 MiB goes up as staged blocks and comes back in several ranged GETs (the default
    thresholds send the test objects in one request each way), and listings with a limit
    come in pages of 2."""
    if request.param == "memory":
        url = f"memory://{uuid.uuid4().hex}"
        backend = open_storage(url)
        yield backend
        MemoryStorage.forget(url)
    elif request.param == "file":
        root = tmp_path / "repo"
        root.mkdir()
        backend = open_storage(f"file://{root}")
        yield backend
    else:
        if request.param == "azure-small-requests":
            from walship.storage import azure

            monkeypatch.setattr(azure, "SINGLE_PUT_MAX", 1 << 20)
            monkeypatch.setattr(azure, "SINGLE_GET_MAX", 1 << 20)
            monkeypatch.setattr(azure, "BLOCK_SIZE", 1 << 20)
            monkeypatch.setattr(azure, "DOWNLOAD_CHUNK", 1 << 20)
            monkeypatch.setattr(azure, "LIST_PAGE_MAX", 2)  # a limit spans several pages
        azure_repo = request.getfixturevalue("azure_repository")
        backend = azure_repo.open()
        yield backend
    backend.close()
