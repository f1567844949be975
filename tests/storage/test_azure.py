"""What the Azure backend asks of the service, beyond the contract every backend meets."""

from __future__ import annotations


def test_a_limited_listing_asks_for_no_more_than_its_limit(azure_repository, monkeypatch):
    """Whether a repository holds any WAL is one request for one entry, however much it
    holds (a full page is up to 5000 entries with their metadata)."""
    backend = azure_repository.open()
    try:
        for n in range(1, 4):
            backend.put(f"wal/{n:024X}", [b"x"])
        asked: list[dict] = []
        real = backend._container.list_blobs

        def list_blobs(**kwargs):
            asked.append(kwargs)
            return real(**kwargs)

        monkeypatch.setattr(backend._container, "list_blobs", list_blobs)
        assert [i.key for i in backend.list("wal/", limit=1)] == [f"wal/{1:024X}"]
        assert asked[-1]["results_per_page"] == 1
        assert len(list(backend.list("wal/"))) == 3
        assert "results_per_page" not in asked[-1]
    finally:
        backend.close()
