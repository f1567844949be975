"""Answers a wal-push or wal-fetch call whose work was already done ahead, before anything heavy
is imported (no click, no codec, no storage SDK): a pushed-ahead record, or a segment waiting in
the prefetch cache. Returns False whenever it cannot answer with certainty; the full program
then handles the call, so this module can only make a call faster, never change its outcome.
"""

from __future__ import annotations

import os
import sys
import time

from walship import spool


def _log(action: str, name: str, outcome: str, size: int, started: float) -> None:
    print(f"walship: {action} {name} {outcome} in={size} out={size} "
          f"seconds={time.monotonic() - started:.3f}", file=sys.stderr, flush=True)


TAKE_UP_SECONDS = 10.0  # for a pusher just started to import, connect and take a file up
RACE_SECONDS = 2.0  # for a running pusher to take up a file a call asks for before it does


def _plain_name(name: str) -> bool:
    """Whether ``name`` has the shape of a WAL file name (a segment, ``.partial``, ``.history``
    or ``.backup`` file; :mod:`walship.wal` has the full rules): anything else goes to the full
    program, which explains the error, and starts no helper process."""
    stem, _, suffix = name.partition(".")
    if len(stem) == 8 and suffix == "history":
        return spool.HEX_DIGITS.issuperset(stem)
    if len(stem) != 24 or not spool.HEX_DIGITS.issuperset(stem):
        return False
    if suffix in ("", "partial"):
        return True
    offset, _, kind = suffix.partition(".")
    return kind == "backup" and len(offset) == 8 and spool.HEX_DIGITS.issuperset(offset)


def wal_push(path: str) -> bool:
    started = time.monotonic()
    if not _plain_name(os.path.basename(path)):
        return False
    if not spool.regular_file(path):
        return False  # (a FIFO, a directory, nothing: the full program refuses it)
    settings = spool.settings_fingerprint()
    wal_dir = os.path.dirname(path) or "."
    outcome = "already pushed ahead"
    try:
        if not spool.take_pushed(path, settings):
            name = os.path.basename(path)
            if spool.safe_dir(wal_dir, spool.spool_dir(wal_dir)) and spool.pusher_alive(wal_dir):
                wait = RACE_SECONDS  # it takes ready files up in order: this one is next
            elif spool.backlog_for_pusher(wal_dir):
                # The first call of a backlog: start the background pusher and let it upload
                # this file with the others, rather than start the full program here as well
                # (the pusher pays the storage SDK's import once, for every call).
                if not spool.safe_dir(wal_dir, spool.spool_dir(wal_dir), create=True):
                    return False
                spool.start_pusher(wal_dir)
                if not spool.await_pusher(wal_dir, spool.START_SECONDS):
                    return False
                wait = TAKE_UP_SECONDS
                outcome = "pushed by the background pusher it started"
            else:
                return False
            if not spool.await_taken_up(wal_dir, name, wait) \
                    or not spool.take_pushed(path, settings):
                return False
        size = os.stat(path).st_size
    except OSError:
        return False
    _log("wal-push", os.path.basename(path), outcome, size, started)
    return True


def wal_fetch(name: str, destination: str) -> int | None:
    """0: delivered; 1: the repository, asked just now by the warm prefetch worker, says
    ``name`` does not exist; None: not answered here (the full program takes the call)."""
    started = time.monotonic()
    if not _plain_name(name):
        return None
    wal_dir = os.path.dirname(destination) or "."
    settings = spool.settings_fingerprint()
    try:
        configured = spool.configured_cache_dir()
        cache = spool.cache_dir(wal_dir, configured)
        base = configured or wal_dir  # (spool's module docstring: Safety)
        usable = spool.safe_dir(base, cache)
        size = spool.deliver_cached(cache, name, destination, settings) if usable else None
        if size is None and (not usable or not spool.worker_alive(cache)) \
                and spool.prefetch_enabled():
            # No worker yet (the first call of a recovery): start it and hand it the lookup,
            # rather than start the full program here as well (the worker pays the storage
            # SDK's import once, for this call and every later one).
            if not spool.safe_dir(base, cache, create=True):
                return None
            usable = True
            spool.seed_want(cache, name, wal_dir)
            spool.start_worker(cache)
            if not spool.await_worker(cache, spool.START_SECONDS):
                return None
        if not usable:
            return None
        if size is None:
            verdict = spool.ask(cache, name, settings)
            if verdict == "missing":
                print(f"walship: wal-fetch {name} not found in the archive (asked by the "
                      f"prefetch worker) seconds={time.monotonic() - started:.3f}",
                      file=sys.stderr, flush=True)
                return 1
            if verdict == "found":
                size = spool.deliver_cached(cache, name, destination, settings, wait=False)
        if size is None:
            return None
    except (OSError, ValueError):  # (ValueError: the cache_dir setting cannot be told)
        return None
    try:
        if len(name) == 24:  # a segment: move the window
            spool.want(cache, name, size)
        spool.start_worker(cache)
    except OSError:  # (a full filesystem): delivered all the same
        pass
    _log("wal-fetch", name, "delivered from prefetch cache", size, started)
    return 0
