"""The prefetch cache: a real worker process keeps the next segments ready, within its bound,
never delivers a corrupt file, never caches "not found", follows a timeline switch, and
survives the worker's death."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from walship import prefetch, spool
from walship.entry import main

SEGMENT = 1 << 20  # wal_segment_size = 1 MB: the smallest, for speed


def name(number: int, timeline: int = 1) -> str:
    return f"{timeline:08X}00000000{number:08X}"


@pytest.fixture
def env(tmp_path, monkeypatch):
    for var in list(os.environ):
        if var.startswith(("WALSHIP_", "AZURE_")):
            monkeypatch.delenv(var)
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setenv("WALSHIP_REPO", f"file://{repo}")
    monkeypatch.setenv("WALSHIP_CONFIG", os.devnull)
    source = tmp_path / "source"
    source.mkdir()
    originals = {}
    for tli, numbers in ((1, range(1, 41)), (2, range(20, 31))):
        for n in numbers:
            data = os.urandom(2000) + n.to_bytes(4, "big") * 100 + bytes(SEGMENT - 2400)
            (source / name(n, tli)).write_bytes(data)
            assert main(["wal-push", str(source / name(n, tli))]) == 0
            originals[name(n, tli)] = data
    restore = tmp_path / "pg_wal"
    restore.mkdir()
    yield restore, originals
    stop_worker(restore)


def cache_of(restore: Path) -> Path:
    return Path(spool.cache_dir(str(restore)))


def stop_worker(restore: Path) -> None:
    lock = cache_of(restore) / "worker.lock"
    if lock.exists() and spool.worker_alive(str(cache_of(restore))):
        pid = lock.read_text().strip()
        if pid.isdigit():
            os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.1)


def wait_for(predicate, seconds=20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def sealed(restore: Path) -> set[str]:
    return {p.name[:-3] for p in cache_of(restore).glob("*.ok")}


def fetch(restore, wal_name, capsys):
    status = main(["wal-fetch", wal_name, str(restore / "RECOVERYXLOG")])
    err = capsys.readouterr().err
    return status, err


def test_recovery_is_fed_from_the_cache(env, capsys, monkeypatch):
    restore, originals = env
    monkeypatch.setenv("WALSHIP_PREFETCH", "6")
    from_cache = 0
    for n in range(1, 36):
        status, err = fetch(restore, name(n), capsys)
        assert status == 0, err
        assert (restore / "RECOVERYXLOG").read_bytes() == originals[name(n)]
        from_cache += "prefetch cache" in err
        if n == 1:
            assert wait_for(lambda: sealed(restore) >= {name(k) for k in range(2, 8)})
    assert from_cache >= 30, from_cache


def test_first_call_hands_its_lookup_to_a_new_worker(env, capsys):
    """The first call of a recovery starts the worker and lets it do the lookup (it would import
    the storage SDK anyway), instead of running the full program as well."""
    restore, originals = env
    status, err = fetch(restore, "00000003.history", capsys)  # recovery asks for this first
    assert status == 1 and "asked by the prefetch worker" in err, err
    assert spool.worker_alive(str(cache_of(restore)))
    stop_worker(restore)
    assert wait_for(lambda: not spool.worker_alive(str(cache_of(restore))))
    status, err = fetch(restore, name(5), capsys)
    assert status == 0 and "delivered from prefetch cache" in err, err
    assert (restore / "RECOVERYXLOG").read_bytes() == originals[name(5)]


def test_a_call_with_no_wal_name_starts_nothing(env, capsys, monkeypatch, tmp_path):
    place = tmp_path / "elsewhere"
    place.mkdir()
    monkeypatch.chdir(place)
    status = main(["wal-fetch", "RECOVERYXLOG", "x"])
    assert status >= 126 and "not a WAL file name" in capsys.readouterr().err
    assert list(place.iterdir()) == []  # no cache directory, no worker


def test_prefetch_off_starts_no_worker(env, capsys, monkeypatch, tmp_path):
    restore, originals = env
    monkeypatch.setenv("WALSHIP_PREFETCH", "0")
    status, err = fetch(restore, name(1), capsys)
    assert status == 0 and "prefetch" not in err, err
    assert not spool.worker_alive(str(cache_of(restore)))
    monkeypatch.delenv("WALSHIP_PREFETCH")  # ... and off in the config file
    config = tmp_path / "walship.toml"
    config.write_text("prefetch = 0\n")
    monkeypatch.setenv("WALSHIP_CONFIG", str(config))
    status, err = fetch(restore, name(2), capsys)
    assert status == 0 and "prefetch" not in err, err
    assert not spool.worker_alive(str(cache_of(restore)))


@pytest.mark.parametrize("prefetch,cache_mb,bound", [(64, 16, 16), (4, 64, 4)])
def test_cache_never_exceeds_its_bound(env, capsys, monkeypatch, prefetch, cache_mb, bound):
    """The window is bounded by ``prefetch`` segments and by ``cache_max_mb``; the segment the
    first call looks up (outside the window) counts against it too."""
    restore, originals = env
    monkeypatch.setenv("WALSHIP_PREFETCH", str(prefetch))
    monkeypatch.setenv("WALSHIP_CACHE_MAX_MB", str(cache_mb))
    cache = cache_of(restore)
    expected = {name(k) for k in range(2, 2 + bound)}
    sizes = []
    stop = threading.Event()

    def sample() -> None:  # from before the first call: its own lookup counts too
        while not stop.is_set():
            try:
                entries = os.listdir(cache)
            except FileNotFoundError:
                entries = []
            # segment data: cached segments (NAME) and downloads (.NAME.walship-...)
            sizes.append(sum(1 for e in entries if len(e) == 24 or ".walship-" in e))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert fetch(restore, name(1), capsys)[0] == 0
        wait_for(lambda: sealed(restore) == expected, 30)
        time.sleep(0.5)  # the worker must not go past the bound once the window is full
    finally:
        stop.set()
        sampler.join()
    assert sealed(restore) == expected
    biggest = max(sizes)
    assert biggest <= bound, biggest


def test_corrupt_cached_file_is_never_delivered(env, capsys):
    restore, originals = env
    assert fetch(restore, name(1), capsys)[0] == 0
    assert wait_for(lambda: name(2) in sealed(restore))
    cached = cache_of(restore) / name(2)
    data = bytearray(cached.read_bytes())
    data[5000] ^= 0x01
    cached.write_bytes(bytes(data))
    status, _ = fetch(restore, name(2), capsys)
    # the damaged copy is dropped; what is delivered is downloaded again (by this call or, when
    # asked, by the worker) and verified
    assert status == 0
    assert (restore / "RECOVERYXLOG").read_bytes() == originals[name(2)]


def test_cached_file_changed_in_place_is_never_delivered(env, capsys):
    """Same inode, same size, one byte flipped through the open file: the seal catches it."""
    restore, originals = env
    assert fetch(restore, name(1), capsys)[0] == 0
    assert wait_for(lambda: name(2) in sealed(restore))
    cached = cache_of(restore) / name(2)
    before = cached.stat()
    with open(cached, "r+b") as handle:
        handle.seek(7000)
        byte = handle.read(1)
        handle.seek(7000)
        handle.write(bytes([byte[0] ^ 0x80]))
    after = cached.stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    status, _ = fetch(restore, name(2), capsys)
    assert status == 0
    delivered = restore / "RECOVERYXLOG"
    assert delivered.read_bytes() == originals[name(2)]
    assert abs(delivered.stat().st_mtime - time.time()) < 60  # not the seal's mtime


def test_seal_of_another_boot_is_not_trusted(env, capsys):
    """After a crash of the machine, unflushed cache writes may be lost: a seal made before the
    current boot is not trusted, whatever the file looks like."""
    restore, originals = env
    assert fetch(restore, name(1), capsys)[0] == 0
    assert wait_for(lambda: name(2) in sealed(restore))
    cache = cache_of(restore)
    seal = cache / f"{name(2)}.ok"
    fields = seal.read_text().split()
    fields[0] = "00000000-0000-0000-0000-000000000000"
    seal.write_text(" ".join(fields) + "\n")
    (cache / name(2)).write_bytes(bytes(SEGMENT))  # what a lost write can leave ...
    os.utime(cache / name(2), ns=(spool.SEALED_MTIME_NS, spool.SEALED_MTIME_NS))  # ... as is
    status, _ = fetch(restore, name(2), capsys)
    assert status == 0
    assert (restore / "RECOVERYXLOG").read_bytes() == originals[name(2)]


def test_not_found_is_never_cached(env, capsys, tmp_path):
    restore, originals = env
    for n in range(36, 41):
        assert fetch(restore, name(n), capsys)[0] == 0
    assert fetch(restore, name(41), capsys)[0] == 1  # end of the archive
    time.sleep(0.3)
    late = tmp_path / "late"  # ... until it is archived
    late.mkdir()
    data = os.urandom(SEGMENT)
    (late / name(41)).write_bytes(data)
    assert main(["wal-push", str(late / name(41))]) == 0
    status, _ = fetch(restore, name(41), capsys)
    assert status == 0 and (restore / "RECOVERYXLOG").read_bytes() == data


def test_timeline_switch_collects_the_old_timeline(env, capsys):
    restore, originals = env
    for n in range(17, 20):
        assert fetch(restore, name(n), capsys)[0] == 0
    assert wait_for(lambda: name(21) in sealed(restore))
    for n in range(20, 31):  # PostgreSQL switched to timeline 2 at segment 20
        status, err = fetch(restore, name(n, 2), capsys)
        assert status == 0, err
        assert (restore / "RECOVERYXLOG").read_bytes() == originals[name(n, 2)]
    assert wait_for(lambda: not any(n.startswith("00000001") for n in sealed(restore)))


def test_worker_death_is_survived(env, capsys):
    restore, originals = env
    assert fetch(restore, name(1), capsys)[0] == 0
    assert wait_for(lambda: len(sealed(restore)) >= 3)
    stop_worker(restore)
    (cache_of(restore) / f"{name(9)}.inflight").touch()  # as if killed mid-download
    for n in range(2, 16):
        status, err = fetch(restore, name(n), capsys)
        assert status == 0, err
        assert (restore / "RECOVERYXLOG").read_bytes() == originals[name(n)]
    assert spool.worker_alive(str(cache_of(restore)))


def test_idle_worker_starts_nothing_and_never_outlives_a_hung_download(env, monkeypatch):
    """Once idle, the worker starts no download and exits when the running ones end; a
    download that hangs past every timeout cannot keep it alive (run() gives up)."""
    import threading

    from walship import prefetch

    restore, _ = env
    cache = cache_of(restore)
    cache.mkdir(parents=True)
    spool.want(str(cache), name(1), SEGMENT)
    monkeypatch.setattr(prefetch, "IDLE_SECONDS", 0.3)
    monkeypatch.setattr(prefetch, "STUCK_SECONDS", 0.7)
    release = threading.Event()
    started: list[str] = []
    worker = prefetch.Worker(str(cache))

    def hang(segment: str) -> None:
        started.append(segment)
        release.wait(30)

    worker.download = hang  # type: ignore[method-assign]
    began = time.monotonic()
    try:
        assert worker.run() is False  # gave up on the hung downloads
        elapsed = time.monotonic() - began
        assert 0.9 < elapsed < 5, elapsed
        before = list(started)
        assert before and all(s in {name(n) for n in range(2, 12)} for s in before)
    finally:
        release.set()
        worker.close()
    # idle with nothing running: it returns cleanly, having started nothing new
    worker = prefetch.Worker(str(cache))
    worker.download = hang  # type: ignore[method-assign]
    (cache / "want").unlink()
    try:
        assert worker.run() is True
        assert not worker.inflight
    finally:
        release.set()
        worker.close()


def test_warm_worker_answers_lookups_fresh_and_never_from_a_cache(env, capsys, tmp_path):
    """With a worker running, a call for a file the cache lacks (a history file, the end of
    the archive) is answered by the worker's own lookup, made after the call began: "not
    found" quickly, and never remembered, so a file archived later is found."""
    restore, _ = env
    assert fetch(restore, name(1), capsys)[0] == 0
    assert wait_for(lambda: spool.worker_alive(str(cache_of(restore))))
    status, err = fetch(restore, "00000003.history", capsys)
    assert status == 1 and "asked by the prefetch worker" in err, err
    later = tmp_path / "later"
    later.mkdir()
    history = b"1\t0/2000000\tno recovery target specified\n"
    (later / "00000003.history").write_bytes(history)
    assert main(["wal-push", str(later / "00000003.history")]) == 0
    status, err = fetch(restore, "00000003.history", capsys)
    assert status == 0 and "prefetch cache" in err, err
    assert (restore / "RECOVERYXLOG").read_bytes() == history
    assert fetch(restore, name(41), capsys)[0] == 1  # end of the archive, asked again


def test_worker_lookup_never_turns_a_missing_repository_into_not_found(env, capsys):
    restore, _ = env
    assert fetch(restore, name(1), capsys)[0] == 0
    assert wait_for(lambda: spool.worker_alive(str(cache_of(restore))))
    repo = Path(os.environ["WALSHIP_REPO"][len("file://"):])
    repo.rename(repo.with_name("unmounted"))
    try:
        status, err = fetch(restore, "00000005.history", capsys)
        assert status >= 126, (status, err)
    finally:
        repo.with_name("unmounted").rename(repo)


def test_a_standby_waits_out_an_outage_with_its_worker(env, capsys, monkeypatch, tmp_path):
    """In a standby (standby.signal in the working directory), a call the worker cannot
    answer because the repository is gone exits 1 with a warning. The worker stays up, caches
    no failure as "missing", and serves the segment once the repository is back."""
    restore, originals = env
    data = tmp_path / "data"
    data.mkdir()
    (data / "standby.signal").touch()
    monkeypatch.chdir(data)
    monkeypatch.setenv("WALSHIP_PREFETCH", "4")
    assert fetch(restore, name(1), capsys)[0] == 0
    cache = cache_of(restore)
    assert wait_for(lambda: spool.worker_alive(str(cache)))
    pid = (cache / "worker.lock").read_text().strip()
    repo = Path(os.environ["WALSHIP_REPO"][len("file://"):])
    repo.rename(repo.with_name("unmounted"))
    try:
        for wanted in (name(20), "00000005.history", name(20)):
            status, err = fetch(restore, wanted, capsys)
            assert status == 1, (status, err)
            assert err.count("WARNING") == 1 and "standby.signal" in err, err
            assert "asked by the prefetch worker" not in err, err  # no "missing" answered
        time.sleep(1)  # the window (21...) fails meanwhile: never remembered as missing
        assert not list(cache.glob("*.missing")), os.listdir(cache)
        assert spool.worker_alive(str(cache))
    finally:
        repo.with_name("unmounted").rename(repo)
    for n in (20, 21, 22):
        status, err = fetch(restore, name(n), capsys)
        assert status == 0, err
        assert (restore / "RECOVERYXLOG").read_bytes() == originals[name(n)]
    assert (cache / "worker.lock").read_text().strip() == pid  # the same worker throughout


def test_a_request_left_by_a_dead_caller_is_answered_once(env):
    from walship import prefetch

    restore, _ = env
    cache = cache_of(restore)
    (cache / "ask").mkdir(parents=True)
    worker = prefetch.Worker(str(cache))
    try:
        (cache / "ask" / "00000007.history.ask").write_text(
            f"abc123 {spool.settings_fingerprint()}\n")
        assert worker.serve_asks([]) is True
        for future in list(worker.asks.values()):
            future.result(timeout=20)
        answer = (cache / "ask" / "00000007.history.answer").read_text().split()
        assert answer == ["abc123", "missing"]
        assert worker.serve_asks([]) is False and not worker.asks  # not looked up again
        (cache / "ask" / "00000007.history.ask").unlink()
        worker.serve_asks([])
        assert worker.served == {}
    finally:
        worker.close()


def test_window_misses_back_off_and_never_list_the_repository(env, monkeypatch):
    """A worker reaching past the end of the archive (a standby waiting for WAL) asks for the
    next segment ever less often, and never lists the repository for it; a call's lookup
    still proves its "not found" with one listing of at most one object."""
    from walship import prefetch

    restore, _ = env
    cache = cache_of(restore)
    (cache / "ask").mkdir(parents=True)
    monkeypatch.setattr(prefetch, "RETRY_SECONDS", 0.05)
    monkeypatch.setattr(prefetch, "RETRY_MAX_SECONDS", 0.2)
    worker = prefetch.Worker(str(cache))
    storage = worker.archive.storage
    gets: list[str] = []
    lists: list[tuple[str, int | None]] = []
    real_get, real_list = storage.get, storage.list

    def get(key):
        gets.append(key)
        return real_get(key)

    def listing(prefix="", *, limit=None):
        lists.append((prefix, limit))
        return real_list(prefix, limit=limit)

    monkeypatch.setattr(storage, "get", get)
    monkeypatch.setattr(storage, "list", listing)
    try:
        want = (name(40), SEGMENT)  # the last segment archived: the window lies beyond it
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            worker.step(want)
            time.sleep(0.005)
        next_one = sum(1 for key in gets if key.endswith(name(41)))
        # without a back-off: one attempt every 0.05 s, about 30; with it: 0.05, 0.1, 0.2,
        # then every 0.2 s, about 9
        assert 4 <= next_one <= 13, gets
        assert lists == []
        assert worker.failures[name(41)] >= 4
        worker.lookup(name(41), "n1", worker.fingerprint)
        assert (cache / "ask" / f"{name(41)}.answer").read_text().split() == ["n1", "missing"]
        assert lists == [("wal/", 1)]
    finally:
        worker.close()


def test_worker_sleeps_until_a_call_wakes_it(env, monkeypatch):
    """An idle worker sleeps on its FIFO instead of polling: a call's ``want`` (or lookup
    request) wakes it at once, as does the end of one of its own downloads."""
    restore, _ = env
    cache = cache_of(restore)
    cache.mkdir(parents=True)
    monkeypatch.setattr(prefetch, "WAKE_SECONDS", 30.0)
    worker = prefetch.Worker(str(cache))
    try:
        assert worker.poll_seconds == 30.0
        timer = threading.Timer(0.2, spool.want, (str(cache), name(5), SEGMENT))
        timer.start()
        began = time.monotonic()
        worker.sleep()
        assert time.monotonic() - began < 10
        timer = threading.Timer(0.2, worker._ended, (None,))
        timer.start()
        began = time.monotonic()
        worker.sleep()
        assert time.monotonic() - began < 10
    finally:
        worker.close()


def test_a_closed_worker_leaves_no_descriptor_open(env):
    restore, _ = env
    cache = cache_of(restore)
    cache.mkdir(parents=True)
    before = set(os.listdir("/proc/self/fd"))
    worker = prefetch.Worker(str(cache))
    assert len(set(os.listdir("/proc/self/fd")) - before) >= 3  # FIFO, pipe
    worker.close()
    assert set(os.listdir("/proc/self/fd")) <= before


def test_worker_without_a_fifo_polls(env):
    restore, _ = env
    cache = cache_of(restore)
    cache.mkdir(parents=True)
    (cache / spool.WAKE).write_text("not a FIFO")
    worker = prefetch.Worker(str(cache))
    try:
        assert worker.poll_seconds == prefetch.POLL_SECONDS
        spool.wake_worker(str(cache))  # writes nothing into a regular file
        assert (cache / spool.WAKE).read_text() == "not a FIFO"
    finally:
        worker.close()


def test_last_segment_is_kept_at_the_end_of_the_archive(env, capsys):
    """Recovery reads its last segment once more when it ends (to start the new timeline):
    once the next segment is known to be missing, the worker keeps that last one cached, and
    the cache still holds no more than the window."""
    restore, originals = env
    for n in (37, 38, 39, 40):
        assert fetch(restore, name(n), capsys)[0] == 0
    assert fetch(restore, name(41), capsys)[0] == 1  # the end of the archive
    assert wait_for(lambda: name(40) in sealed(restore))
    status, err = fetch(restore, name(40), capsys)
    assert status == 0 and "prefetch cache" in err, err
    assert (restore / "RECOVERYXLOG").read_bytes() == originals[name(40)]
    assert len([p for p in cache_of(restore).iterdir() if len(p.name) == 24]) <= 8


@pytest.mark.parametrize("start, seeded", [
    ("000000010000000000000026", "000000010000000000000025"),
    ("000000020000000100000000", "0000000200000000000000FF"),  # across a log id
    ("000000010000000000000000", None),  # nothing before the first segment
])
def test_first_call_seeds_the_window_from_backup_label(tmp_path, start, seeded):
    """A recovery asks for a history file first: the worker it starts is told to begin at the
    base backup's first segment (the window starts after ``want``)."""
    wal = tmp_path / "pg_wal"
    cache = tmp_path / "pg_wal" / "walship" / "prefetch"
    cache.mkdir(parents=True)
    (tmp_path / "backup_label").write_text(
        f"START WAL LOCATION: 0/26000028 (file {start})\nCHECKPOINT LOCATION: 0/26000060\n")
    spool.seed_want(str(cache), "00000002.history", str(wal))
    want = (cache / "want").read_text() if (cache / "want").exists() else None
    assert want == (f"{seeded} {16 << 20}\n" if seeded else None)


def test_seeding_never_overrides_a_call(tmp_path):
    wal = tmp_path / "pg_wal"
    cache = wal / "walship" / "prefetch"
    cache.mkdir(parents=True)
    spool.seed_want(str(cache), name(7), str(wal))
    assert (cache / "want").read_text() == f"{name(7)} {16 << 20}\n"
    (tmp_path / "backup_label").write_text(f"START WAL LOCATION: 0/1 (file {name(30)})\n")
    spool.seed_want(str(cache), "00000002.history", str(wal))
    assert (cache / "want").read_text() == f"{name(7)} {16 << 20}\n"


def test_a_new_worker_sweeps_leftovers_but_never_a_call_in_progress(env, capsys):
    """What killed workers and calls left in the cache goes when the next worker starts: the
    worker's own partial downloads and markers at once, the calls' temporary files and
    requests only once older than any call lives (a call may be writing one right now)."""
    restore, _ = env
    cache = cache_of(restore)
    (cache / "ask").mkdir(parents=True)
    long_ago = time.time() - 2 * 3600
    gone = [cache / f".{name(5)}.walship-0a1b2c3d", cache / f"{name(5)}.inflight",
            cache / "want.tmp4242", cache / "ask" / "00000008.history.ask",
            cache / "ask" / "00000008.history.answer"]
    kept = [cache / "want.tmp4343", cache / "ask" / "00000009.history.ask.tmp4343"]
    for path in (*gone, *kept):
        path.write_text("left\n")
    for path in gone[2:]:
        os.utime(path, (long_ago, long_ago))
    status, err = fetch(restore, name(1), capsys)
    assert status == 0, err
    assert wait_for(lambda: not any(path.exists() for path in gone)), \
        [path.name for path in gone if path.exists()]
    assert all(path.exists() for path in kept)


# -- fall-overs the worker made reach PostgreSQL's log (issue 14) ------------------------------
FALL_OVER = "repository primary could not answer"


def test_a_fall_over_of_the_worker_is_told_once_by_the_call_that_delivers(tmp_path, monkeypatch,
                                                                           capsys):
    """The primary is lost, the worker fetches from the sync mirror: the calls PostgreSQL
    makes deliver from the cache and one of them (not each) prints the worker's fall-over line
    on its stderr, PostgreSQL's log; the worker's own log has it too."""
    for var in list(os.environ):
        if var.startswith(("WALSHIP_", "AZURE_")):
            monkeypatch.delenv(var)
    roots = {n: tmp_path / n for n in ("primary", "west")}
    for root in roots.values():
        root.mkdir()
    config = tmp_path / "walship.toml"
    config.write_text(f'repo = "file://{roots["primary"]}"\n[[mirrors]]\nname = "west"\n'
                      f'repo = "file://{roots["west"]}"\nmode = "sync"\n')
    monkeypatch.setenv("WALSHIP_CONFIG", str(config))
    monkeypatch.setenv("WALSHIP_PUSH_AHEAD", "0")
    monkeypatch.setenv("WALSHIP_PREFETCH", "4")
    source = tmp_path / "source"
    source.mkdir()
    originals = {}
    for n in range(1, 13):
        data = os.urandom(2000) + bytes(SEGMENT - 2000)
        (source / name(n)).write_bytes(data)
        assert main(["wal-push", str(source / name(n))]) == 0
        originals[name(n)] = data
    roots["primary"].rename(tmp_path / "primary-lost")
    restore = tmp_path / "pg_wal"
    restore.mkdir()
    try:
        told = []
        for n in range(1, 13):
            status, err = fetch(restore, name(n), capsys)
            assert status == 0, err
            assert (restore / "RECOVERYXLOG").read_bytes() == originals[name(n)]
            told += [line for line in err.splitlines() if FALL_OVER in line]
            if n == 1:
                assert wait_for(lambda: sealed(restore) >= {name(k) for k in range(2, 6)})
        assert len(told) == 1, told
        assert told[0].startswith("walship: wal-fetch 0000000100000000000000")
        assert "WARNING (prefetch worker): repository primary could not answer" in told[0]
        assert "reading from repository west" in told[0]
        assert FALL_OVER in (cache_of(restore) / "worker.log").read_text()
    finally:
        stop_worker(restore)


def test_a_seal_carries_notes_for_the_call_that_delivers(tmp_path, capsys):
    """Notes ride in the seal: the file stays deliverable, the delivering call prints each once,
    a seal without notes prints nothing (and is what it always was)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    settings = spool.settings_fingerprint()
    for notes in ((), ("repository primary could not answer (x): reading from repository west",
                       "a second\nline")):
        (cache / name(1)).write_bytes(b"w" * 100)
        spool.seal_cached(str(cache), name(1), settings, notes)
        seal = (cache / f"{name(1)}.ok").read_text()
        assert len(seal.split("\n", 1)[0].split()) == 4 and seal.count("\n") == 1 + len(notes)
        assert spool.intact(str(cache), name(1), settings) == 100
        capsys.readouterr()
        assert spool.deliver_cached(str(cache), name(1), str(tmp_path / "out"), settings) == 100
        err = capsys.readouterr().err
        assert err.splitlines() == [f"walship: wal-fetch {name(1)}: WARNING (prefetch worker): "
                                    f"{' '.join(note.split())}" for note in notes]
