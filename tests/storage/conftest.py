"""Yields one fresh, empty repository per backend for the storage contract suite."""

from __future__ import annotations

import uuid

import pytest

from walship.storage import open_storage
from walship.storage.memory import MemoryStorage


@pytest.fixture(params=["memory", "file", "azure", "azure-sdk", "azure-sas",
                        "azure-small-requests"])
def storage(request, tmp_path, monkeypatch):
    """``azure`` speaks REST with the account key (the default for a connection string) and
    ``azure-sas`` with a SAS token. ``azure-small-requests`` has 1 MiB thresholds, so that every
    object of more than 1 MiB goes up as staged blocks (through the SDK, next to REST for the
    rest), and listings with a limit come in pages of 2 (the default thresholds send the test
    objects in one request). ``azure-sdk`` goes through the Azure SDK for everything, with the
    same small thresholds, so that objects also come back in several ranged GETs."""
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
        if request.param in ("azure-small-requests", "azure-sdk"):
            from walship.storage import azure

            monkeypatch.setattr(azure, "SINGLE_PUT_MAX", 1 << 20)
            monkeypatch.setattr(azure, "SINGLE_GET_MAX", 1 << 20)
            monkeypatch.setattr(azure, "BLOCK_SIZE", 1 << 20)
            monkeypatch.setattr(azure, "DOWNLOAD_CHUNK", 1 << 20)
            monkeypatch.setattr(azure, "LIST_PAGE_MAX", 2)  # a limit spans several pages
        azure_repo = request.getfixturevalue("azure_repository")
        if request.param == "azure-sas":
            backend = azure_repo.open_with_sas()
        else:
            backend = azure_repo.open(transport="sdk" if request.param == "azure-sdk" else "auto")
        yield backend
    backend.close()
