"""walship.entry: the program's start and end."""

from __future__ import annotations

import gc

import pytest

from walship import entry


def test_the_program_ends_with_mains_status_its_objects_frozen_out_of_the_collector(
        monkeypatch):
    """``run`` ends the process with :func:`walship.entry.main`'s status, and first freezes
    what is left out of the garbage collector (the collections at exit would walk every
    object of a backup only for the process to end: 60-90 ms of an incr, measured); the
    collector runs less often meanwhile."""
    calls: list[str] = []
    thresholds: list[tuple[int, ...]] = []
    monkeypatch.setattr(entry, "main", lambda: calls.append("main") or 3)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "set_threshold", lambda *values: thresholds.append(values))
    with pytest.raises(SystemExit) as ended:
        entry.run()
    assert ended.value.code == 3 and calls == ["main", "freeze"]
    # (and the collector looks for cycles less often: a backup makes objects, few cycles)
    assert thresholds == [(entry.GC_THRESHOLD, *gc.get_threshold()[1:])]
    assert entry.GC_THRESHOLD > gc.get_threshold()[0]
