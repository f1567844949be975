"""The native launcher (native/launcher.c): it delivers a sealed, intact segment from the
prefetch cache exactly when walship.spool would, and hands every other call, unchanged, to the
Python program beside it. Built here from the tree's source with the machine's C compiler."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from walship import spool

ROOT = Path(__file__).resolve().parent.parent
SEGMENT = "0000000100000000000000AB"
SIZE = 1 << 20


def _compiler() -> str | None:
    return next((found for found in map(shutil.which, ("cc", "gcc")) if found), None)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Path:
    """The launcher, compiled with warnings as errors, and a stand-in ``walship-py`` beside it
    that records the arguments it was handed and exits 42."""
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C compiler: walship installs its Python launcher instead")
    bin_dir = tmp_path_factory.mktemp("bin")
    binary = bin_dir / "walship"
    subprocess.run([compiler, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary),
                    str(ROOT / "native" / "launcher.c")], check=True)
    stand_in = bin_dir / "walship-py"
    stand_in.write_text('#!/bin/sh\nprintf "%s\\n" "$0" "$@" > "${0%/*}/handed-over"\nexit 42\n')
    stand_in.chmod(0o755)
    return binary


@pytest.fixture
def site(tmp_path, launcher):
    """A pg_wal with a live worker (this test holds its lock) and a clean environment."""
    (launcher.parent / "handed-over").unlink(missing_ok=True)
    wal = tmp_path / "pg_wal"
    cache = Path(spool.cache_dir(str(wal)))
    cache.mkdir(parents=True)
    lock = os.open(cache / "worker.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("WALSHIP_", "AZURE_"))}
    env.update(WALSHIP_REPO=f"file://{tmp_path}/repo", WALSHIP_CONFIG=str(tmp_path / "none"))
    yield wal, cache, env
    os.close(lock)


def seal(cache: Path, env: dict[str, str], name: str = SEGMENT) -> bytes:
    data = os.urandom(64) + bytes(SIZE - 64)
    (cache / name).write_bytes(data)
    spool.seal_cached(str(cache), name, spool.settings_fingerprint(env))
    return data


def call(launcher: Path, env: dict[str, str], *args: str, cwd: Path | None = None):
    return subprocess.run([str(launcher), *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def handed_over(launcher: Path) -> list[str] | None:
    record = launcher.parent / "handed-over"
    return record.read_text().splitlines()[1:] if record.exists() else None


def test_delivers_a_sealed_segment_without_python(launcher, site):
    wal, cache, env = site
    data = seal(cache, env)
    os.mkfifo(cache / spool.WAKE, 0o600)
    wake = os.open(cache / spool.WAKE, os.O_RDWR | os.O_NONBLOCK)
    done = call(launcher, env, "wal-fetch", SEGMENT, str(wal / "RECOVERYXLOG"))
    assert os.read(wake, 16) == b"!"  # the worker is woken to move its window
    os.close(wake)
    assert done.returncode == 0, done.stderr
    assert handed_over(launcher) is None
    assert (wal / "RECOVERYXLOG").read_bytes() == data
    assert time.time() - (wal / "RECOVERYXLOG").stat().st_mtime < 60  # not the seal's date
    assert not (cache / SEGMENT).exists() and not (cache / f"{SEGMENT}.ok").exists()
    assert (cache / "want").read_text() == f"{SEGMENT} {SIZE}\n"  # the window moves on
    assert f"wal-fetch {SEGMENT} delivered from prefetch cache in={SIZE}" in done.stderr


def test_relative_destination_as_postgresql_passes_it(launcher, site):
    wal, cache, env = site
    data = seal(cache, env)
    done = call(launcher, env, "wal-fetch", SEGMENT, "pg_wal/RECOVERYXLOG", cwd=wal.parent)
    assert done.returncode == 0 and handed_over(launcher) is None, done.stderr
    assert (wal / "RECOVERYXLOG").read_bytes() == data


@pytest.mark.parametrize("variables", [
    {},
    {"AZURE_STORAGE_CONNECTION_STRING": "AccountName=a;AccountKey=k==;", "WALSHIP_KEY": "x y"},
    # Python orders keys, not "KEY=VALUE" strings: "-" sorts before "=", so these differ.
    {"WALSHIP_A": "1", "WALSHIP_A-B": "2", "WALSHIP_A_B": "3", "AZURE_": ""},
    {"WALSHIP_PREFETCH": "8", "WALSHIP_LABEL": "café ☕", "WALSHIP_EMPTY": ""},
    {"WALSHIP_CONFIG": ""},  # empty: the default file, as in Python
    {"WALSHIP_CONFIG": "CONFIG"},  # an existing file: its identity counts
])
def test_settings_fingerprint_agrees_with_python(launcher, site, tmp_path, variables):
    wal, cache, env = site
    config = tmp_path / "walship.toml"
    config.write_text('repo = "file:///x"\n')
    env.update({key: str(config) if value == "CONFIG" else value
                for key, value in variables.items()})
    seal(cache, env)
    done = call(launcher, env, "wal-fetch", SEGMENT, str(wal / "RECOVERYXLOG"))
    assert (done.returncode, handed_over(launcher)) == (0, None), done.stderr


def _other_settings(cache, env, tmp_path):
    env["WALSHIP_REPO"] += "-elsewhere"


def _config_changed(cache, env, tmp_path):
    Path(env["WALSHIP_CONFIG"]).write_text("# now it exists\n")


def _content_changed(cache, env, tmp_path):
    with open(cache / SEGMENT, "r+b") as handle:
        handle.write(b"x")  # same size and inode, but the mtime moves


def _replaced(cache, env, tmp_path):
    shutil.copy(cache / SEGMENT, tmp_path / "copy")
    os.utime(tmp_path / "copy", ns=(spool.SEALED_MTIME_NS,) * 2)
    os.replace(tmp_path / "copy", cache / SEGMENT)  # same bytes and mtime, another inode


def _other_boot(cache, env, tmp_path):
    text = (cache / f"{SEGMENT}.ok").read_text().split()
    (cache / f"{SEGMENT}.ok").write_text(" ".join(["0" * 36, *text[1:]]) + "\n")


def _extra_field(cache, env, tmp_path):
    (cache / f"{SEGMENT}.ok").write_text((cache / f"{SEGMENT}.ok").read_text().strip() + " x\n")


def _no_worker(cache, env, tmp_path):
    (cache / "worker.lock").rename(cache / "worker.lock.gone")  # its holder keeps the old file


@pytest.mark.parametrize("change", [_other_settings, _config_changed, _content_changed, _replaced,
                                    _other_boot, _extra_field, _no_worker])
def test_hands_over_whenever_the_seal_does_not_hold(launcher, site, tmp_path, change):
    wal, cache, env = site
    seal(cache, env)
    change(cache, env, tmp_path)
    args = ["wal-fetch", SEGMENT, str(wal / "RECOVERYXLOG")]
    done = call(launcher, env, *args)
    assert done.returncode == 42 and handed_over(launcher) == args, done.stderr
    assert not (wal / "RECOVERYXLOG").exists() and (cache / SEGMENT).exists()


def test_a_seal_with_notes_goes_to_python_which_prints_them(launcher, site):
    """A seal carrying the worker's notes (a fall-over, once per episode) is left to Python,
    whose delivery prints them in PostgreSQL's log (spool.deliver_cached); every other seal
    stays the launcher's."""
    wal, cache, env = site
    seal(cache, env)
    spool.seal_cached(str(cache), SEGMENT, spool.settings_fingerprint(env),
                      ["repository primary could not answer (x): reading from repository west"])
    args = ["wal-fetch", SEGMENT, str(wal / "RECOVERYXLOG")]
    done = call(launcher, env, *args)
    assert done.returncode == 42 and handed_over(launcher) == args, done.stderr
    assert not (wal / "RECOVERYXLOG").exists() and (cache / SEGMENT).exists()


@pytest.mark.parametrize("args", [
    ["wal-fetch", SEGMENT.lower(), "pg_wal/RECOVERYXLOG"],
    ["wal-fetch", "000000010000000000000001.gz", "pg_wal/RECOVERYXLOG"],
    ["wal-fetch", SEGMENT, "pg_wal/RECOVERYXLOG", "--debug"],
    ["wal-push", "pg_wal/000000010000000000000001"],
    ["status", "--dbname", "host=/tmp"],
    [],
])
def test_other_calls_go_to_python_unchanged(launcher, site, args):
    wal, cache, env = site
    seal(cache, env)
    done = call(launcher, env, *args, cwd=wal.parent)
    assert done.returncode == 42 and handed_over(launcher) == args, done.stderr
    assert (cache / SEGMENT).exists()


def test_waits_for_a_segment_being_downloaded(launcher, site):
    wal, cache, env = site
    marker = cache / f"{SEGMENT}.inflight"
    marker.touch()

    def worker() -> None:
        time.sleep(0.4)
        seal(cache, env)
        marker.unlink()

    thread = threading.Thread(target=worker)
    thread.start()
    started = time.monotonic()
    done = call(launcher, env, "wal-fetch", SEGMENT, str(wal / "RECOVERYXLOG"))
    thread.join()
    assert done.returncode == 0 and handed_over(launcher) is None, done.stderr
    assert time.monotonic() - started >= 0.4
    assert (wal / "RECOVERYXLOG").stat().st_size == SIZE


def test_a_download_that_ends_unsealed_is_looked_up_again(launcher, site):
    """The worker's download failed: the call asks the worker to look the segment up; the
    worker's answer decides (here an error: Python takes the call)."""
    wal, cache, env = site
    marker = cache / f"{SEGMENT}.inflight"
    marker.touch()
    threading.Timer(0.3, marker.unlink).start()
    thread = answer_lookups(cache, env, "error")
    done = call(launcher, env, "wal-fetch", SEGMENT, str(wal / "RECOVERYXLOG"))
    thread.join()
    assert done.returncode == 42, done.stderr


@pytest.mark.parametrize("args, status", [
    (["wal-fetch", SEGMENT, "pg_wal/RECOVERYXLOG"], 134),  # recovery stops, never ends early
    (["wal-push", "pg_wal/000000010000000000000001"], 6),
])
def test_without_its_python_program_it_fails_loudly(launcher, site, tmp_path, args, status):
    wal, cache, env = site
    (cache / "worker.lock").rename(cache / "gone")  # no worker: straight to Python
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(launcher, alone / "walship")
    done = call(alone / "walship", env, *args, cwd=wal.parent)
    assert done.returncode == status
    assert "cannot start" in done.stderr and "reinstall walship" in done.stderr


def test_installed_command_is_the_launcher_where_a_compiler_exists(launcher):
    """The installation under test (WALSHIP_TEST_BIN, as PostgreSQL calls it) was built with the
    launcher, since this machine has a C compiler; the Python program sits beside it."""
    from tests.fixtures.postgres import _find_walship

    installed = _find_walship()
    if installed is None:
        pytest.skip("walship is not installed as a command here")
    with open(installed, "rb") as handle:
        assert handle.read(4) == b"\x7fELF", f"{installed} is not the native launcher"
    assert os.access(Path(installed).with_name("walship-py"), os.X_OK)


def test_check_tells_which_launcher_is_installed(tmp_path):
    from walship.entry import installed_launcher

    program = tmp_path / "walship-py"
    assert installed_launcher(str(program)).startswith("unknown")
    (tmp_path / "walship").write_bytes(b"\x7fELF\x02\x01\x01")
    assert installed_launcher(str(program)).startswith("native")
    (tmp_path / "walship").write_text("#!/usr/bin/python3\n")
    assert installed_launcher(str(program)).startswith("python (no C compiler")


# -- wal-push: records of files pushed ahead ----------------------------------------------------
@pytest.fixture
def pushed_site(tmp_path, launcher):
    (launcher.parent / "handed-over").unlink(missing_ok=True)
    wal = tmp_path / "pg_wal"
    wal.mkdir()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("WALSHIP_", "AZURE_"))}
    env.update(WALSHIP_REPO=f"file://{tmp_path}/repo", WALSHIP_CONFIG=str(tmp_path / "none"))
    return wal, env


def record(wal: Path, name: str, size: int, env: dict[str, str]) -> Path:
    path = wal / name
    path.write_bytes(os.urandom(size))
    spool.record_pushed(str(wal), name, spool.file_fingerprint(str(path)),
                        spool.settings_fingerprint(env))
    return Path(spool.spool_dir(str(wal))) / "pushed" / name


@pytest.mark.parametrize("name, size", [
    ("000000010000000000000001", SIZE),
    ("000000010000000000000002", 12_000),  # the two 8 KiB edges overlap: read once
    ("000000010000000000000003", 8192),
    ("00000002.history", 42),
    ("000000010000000000000004.partial", SIZE),
    ("000000010000000000000004.00000028.backup", 300),
    ("000000010000000000000005", 0),
])
def test_push_recorded_ahead_is_answered_without_python(launcher, pushed_site, name, size):
    wal, env = pushed_site
    entry = record(wal, name, size, env)
    done = call(launcher, env, "wal-push", f"pg_wal/{name}", cwd=wal.parent)
    assert (done.returncode, handed_over(launcher)) == (0, None), done.stderr
    assert not entry.exists()  # consumed: PostgreSQL asks once per file
    assert f"wal-push {name} already pushed ahead in={size}" in done.stderr


def _touched(wal, name, env):
    with open(wal / name, "r+b") as handle:
        handle.seek(5000)
        handle.write(b"changed")  # inside neither 8 KiB edge: the mtime tells


def _settings_changed(wal, name, env):
    env["WALSHIP_REPO"] += "-elsewhere"


def _unrecorded(wal, name, env):
    os.unlink(Path(spool.spool_dir(str(wal))) / "pushed" / name)


@pytest.mark.parametrize("name", ["000000010000000000000001\n", "00000002.history\n"])
def test_a_name_with_a_trailing_newline_goes_to_python(launcher, pushed_site, name):
    """Even with a valid record beside it: the Python program refuses such a name (WAL names
    are matched in full), so the launcher must not answer it."""
    wal, env = pushed_site
    entry = record(wal, name, 3 * 8192, env)
    for args in (["wal-push", str(wal / name)], ["wal-fetch", name, str(wal / "RECOVERYXLOG")]):
        done = call(launcher, env, *args)
        assert done.returncode == 42, done.stderr
        assert (launcher.parent / "handed-over").read_text().split("\n")[1:-1] == [
            args[0], *args[1].split("\n"), *args[2:]]
    assert entry.exists()


@pytest.mark.parametrize("change", [_touched, _settings_changed, _unrecorded])
def test_push_hands_over_unless_the_record_holds(launcher, pushed_site, change):
    wal, env = pushed_site
    name = "000000010000000000000001"
    record(wal, name, 3 * 8192, env)
    change(wal, name, env)
    done = call(launcher, env, "wal-push", str(wal / name))
    assert done.returncode == 42 and handed_over(launcher) == ["wal-push", str(wal / name)]


def test_push_waits_for_the_pusher_uploading_the_file(launcher, pushed_site):
    wal, env = pushed_site
    name = "000000010000000000000001"
    root = Path(spool.spool_dir(str(wal)))
    (root / "pushing").mkdir(parents=True)
    (root / "pushing" / name).touch()
    lock = os.open(root / "pusher.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    (wal / name).write_bytes(os.urandom(SIZE))

    def pusher() -> None:
        time.sleep(0.4)
        spool.record_pushed(str(wal), name, spool.file_fingerprint(str(wal / name)),
                            spool.settings_fingerprint(env))
        (root / "pushing" / name).unlink()

    thread = threading.Thread(target=pusher)
    thread.start()
    try:
        done = call(launcher, env, "wal-push", str(wal / name))
    finally:
        thread.join()
        os.close(lock)
    assert (done.returncode, handed_over(launcher)) == (0, None), done.stderr


# -- wal-fetch: lookups by the worker (spool.ask) -------------------------------------------------
def answer_lookups(cache: Path, env: dict[str, str], verdict: str, *, seal_first: bool = False,
                   nonce: str | None = None) -> threading.Thread:
    """Play the worker's part of spool.ask once: check the request's settings fingerprint
    against Python's, then answer it."""
    def worker() -> None:
        directory = cache / "ask"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            requests = list(directory.glob("*.ask")) if directory.exists() else []
            if requests:
                request = requests[0]
                fields = request.read_text().split()
                name = request.name[:-len(".ask")]
                answer = verdict if fields[1] == spool.settings_fingerprint(env) else "error"
                if seal_first and answer == "found":
                    seal(cache, env, name)
                spool.write_atomically(str(directory / f"{name}.answer"),
                                       f"{nonce or fields[0]} {answer}\n")
                return
            time.sleep(0.005)

    thread = threading.Thread(target=worker)
    thread.start()
    return thread


@pytest.mark.parametrize("name", ["00000002.history", SEGMENT, f"{SEGMENT}.partial"])
def test_a_fresh_missing_from_the_worker_is_not_found(launcher, site, name):
    wal, cache, env = site
    thread = answer_lookups(cache, env, "missing")
    done = call(launcher, env, "wal-fetch", name, str(wal / "RECOVERYXLOG"))
    thread.join()
    assert (done.returncode, handed_over(launcher)) == (1, None), done.stderr
    assert f"wal-fetch {name} not found in the archive (asked by the prefetch worker)" \
        in done.stderr
    assert not list((cache / "ask").iterdir())  # request and answer cleaned up


def test_a_file_found_by_the_worker_is_delivered(launcher, site):
    wal, cache, env = site
    thread = answer_lookups(cache, env, "found", seal_first=True)
    done = call(launcher, env, "wal-fetch", "00000002.history", str(wal / "RECOVERYHISTORY"))
    thread.join()
    assert (done.returncode, handed_over(launcher)) == (0, None), done.stderr
    assert (wal / "RECOVERYHISTORY").stat().st_size == SIZE
    assert not (cache / "want").exists()  # only segments move the window


@pytest.mark.parametrize("verdict, nonce", [("error", None), ("maybe", None),
                                            ("missing", "0123456789abcdef")])
def test_any_other_answer_goes_to_python(launcher, site, verdict, nonce):
    """An error, an unknown word, or an answer to somebody else's request (another nonce):
    never "not found"."""
    wal, cache, env = site
    thread = answer_lookups(cache, env, verdict, nonce=nonce)
    if nonce:  # the real answer never comes: the worker dies, the call hands over
        threading.Timer(0.5, lambda: (cache / "worker.lock").rename(cache / "gone")).start()
    args = ["wal-fetch", "00000002.history", str(wal / "RECOVERYHISTORY")]
    done = call(launcher, env, *args)
    thread.join()
    assert done.returncode == 42 and handed_over(launcher) == args, done.stderr


# -- the cache_dir setting (spool.cache_dir, spool.configured_cache_dir) ---------------------------
@pytest.fixture
def configured_site(tmp_path, launcher):
    """A pg_wal whose cache is under WALSHIP_CACHE_DIR, with a live worker (this test holds its
    lock), placed where Python puts it."""
    (launcher.parent / "handed-over").unlink(missing_ok=True)
    wal = tmp_path / "pg_wal"
    wal.mkdir()
    home = tmp_path / "cachehome"
    home.mkdir()
    cache = Path(spool.cache_dir(str(wal), str(home)))
    cache.mkdir()
    lock = os.open(cache / "worker.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("WALSHIP_", "AZURE_"))}
    env.update(WALSHIP_REPO=f"file://{tmp_path}/repo", WALSHIP_CONFIG=str(tmp_path / "none"),
               WALSHIP_CACHE_DIR=str(home))
    yield wal, cache, env
    os.close(lock)


@pytest.mark.parametrize("relative", [False, True])
def test_delivers_from_the_cache_dir_python_uses(launcher, configured_site, relative):
    wal, cache, env = configured_site
    data = seal(cache, env)
    destination = "pg_wal/RECOVERYXLOG" if relative else str(wal / "RECOVERYXLOG")
    done = call(launcher, env, "wal-fetch", SEGMENT, destination, cwd=wal.parent)
    assert (done.returncode, handed_over(launcher)) == (0, None), done.stderr
    assert (wal / "RECOVERYXLOG").read_bytes() == data
    assert (cache / "want").read_text() == f"{SEGMENT} {SIZE}\n"
    assert not (wal / "walship").exists()


def test_a_config_file_naming_cache_dir_goes_to_python(launcher, site, tmp_path):
    """Only Python reads the config file's settings: the launcher does not guess where a
    cache_dir set there puts the cache (even when the cache beside pg_wal is ready)."""
    wal, cache, env = site
    config = tmp_path / "walship.toml"
    config.write_text('repo = "file:///x"\n' + "#" * 70000 + '\ncache_dir = "/var/cache/w"\n')
    env["WALSHIP_CONFIG"] = str(config)  # (the word lies beyond the launcher's first read)
    seal(cache, env)
    args = ["wal-fetch", SEGMENT, str(wal / "RECOVERYXLOG")]
    done = call(launcher, env, *args)
    assert done.returncode == 42 and handed_over(launcher) == args, done.stderr
    assert (cache / SEGMENT).exists()


def test_a_relative_cache_dir_goes_to_python(launcher, configured_site):
    wal, cache, env = configured_site
    seal(cache, env)
    env["WALSHIP_CACHE_DIR"] = "cachehome"
    args = ["wal-fetch", SEGMENT, "pg_wal/RECOVERYXLOG"]
    done = call(launcher, env, *args, cwd=wal.parent)
    assert done.returncode == 42 and handed_over(launcher) == args, done.stderr


def test_a_cache_on_another_filesystem_goes_to_python_sealed(launcher, tmp_path):
    """No rename across filesystems: Python copies (spool._copy_sealed). The launcher leaves
    the cached file exactly as sealed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    (launcher.parent / "handed-over").unlink(missing_ok=True)
    wal = tmp_path / "pg_wal"
    wal.mkdir()
    home = tmp_path / "cachehome"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(home)], check=True)
    lock = -1
    try:
        cache = Path(spool.cache_dir(str(wal), str(home)))
        cache.mkdir()
        lock = os.open(cache / "worker.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("WALSHIP_", "AZURE_"))}
        env.update(WALSHIP_REPO=f"file://{tmp_path}/repo",
                   WALSHIP_CONFIG=str(tmp_path / "none"), WALSHIP_CACHE_DIR=str(home))
        seal(cache, env)
        args = ["wal-fetch", SEGMENT, str(wal / "RECOVERYXLOG")]
        done = call(launcher, env, *args)
        assert done.returncode == 42 and handed_over(launcher) == args, done.stderr
        assert spool.intact(str(cache), SEGMENT, spool.settings_fingerprint(env)) == SIZE
    finally:
        if lock >= 0:
            os.close(lock)
        subprocess.run(["umount", "-l", str(home)], check=False)


# -- safety: the same rules as spool.safe_dir ----------------------------------------------------
def _linked_cache(wal, cache, tmp_path):
    os.rename(cache, tmp_path / "victim")
    cache.symlink_to(tmp_path / "victim")


def _linked_spool(wal, cache, tmp_path):
    os.rename(wal / spool.SPOOL, tmp_path / "victim")
    (wal / spool.SPOOL).symlink_to(tmp_path / "victim")


def _others_cache(wal, cache, tmp_path):
    os.chown(cache, 65534, 65534)


def _writable_pg_wal(wal, cache, tmp_path):
    os.chmod(wal, 0o777)


def _linked_segment(wal, cache, tmp_path):
    os.rename(cache / SEGMENT, tmp_path / "real")
    (cache / SEGMENT).symlink_to(tmp_path / "real")  # the seal's inode and size still match


@pytest.mark.parametrize("unsafe", [_linked_cache, _linked_spool, _others_cache,
                                    _writable_pg_wal, _linked_segment])
def test_never_delivers_through_an_unsafe_spool(launcher, site, tmp_path, unsafe):
    wal, cache, env = site
    seal(cache, env)
    unsafe(wal, cache, tmp_path)
    args = ["wal-fetch", SEGMENT, str(wal / "RECOVERYXLOG")]
    done = call(launcher, env, *args)
    assert done.returncode == 42 and handed_over(launcher) == args, done.stderr
    assert not (wal / "RECOVERYXLOG").exists()


@pytest.mark.parametrize("unsafe", ["linked spool", "others' records"])
def test_push_records_in_an_unsafe_spool_are_not_trusted(launcher, pushed_site, tmp_path,
                                                         unsafe):
    wal, env = pushed_site
    name = "000000010000000000000001"
    entry = record(wal, name, SIZE, env)
    if unsafe == "linked spool":
        os.rename(wal / spool.SPOOL, tmp_path / "victim")
        (wal / spool.SPOOL).symlink_to(tmp_path / "victim")
    else:
        os.chown(entry.parent, 65534, 65534)
    done = call(launcher, env, "wal-push", str(wal / name))
    assert done.returncode == 42 and handed_over(launcher) == ["wal-push", str(wal / name)]


def test_a_push_record_for_a_fifo_never_blocks(launcher, pushed_site):
    wal, env = pushed_site
    name = "000000010000000000000001"
    record(wal, name, SIZE, env)
    (wal / name).unlink()
    os.mkfifo(wal / name)
    done = subprocess.run([str(launcher), "wal-push", str(wal / name)], env=env,
                          capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode == 42 and handed_over(launcher) == ["wal-push", str(wal / name)]
