"""Yields one fresh, empty repository per backend for the storage contract suite."""

from __future__ import annotations

import uuid

import pytest

from walship.storage import open_storage
from walship.storage.memory import MemoryStorage


@pytest.fixture(params=["memory", "file", "azure"])
def storage(request, tmp_path):
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
        azure_repo = request.getfixturevalue("azure_repository")
        backend = azure_repo.open()
        yield backend
    backend.close()
