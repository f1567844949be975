"""restore and backup-fetch refuse bad input before anything is asked of the repository or
written (one line: what, why, hint; exit 2), and what restore writes into postgresql.auto.conf
is quoted so that PostgreSQL itself reads back exactly the value given."""

from __future__ import annotations

import os
import re
import shlex
from datetime import datetime
from pathlib import Path

import pytest

from tests.backup.test_pipeline import FakeSource, make_cluster, push_wal_names
from tests.fixtures.postgres import chown_to

from walship.archive import Archive
from walship.backup import fetch, layout
from walship.backup import restore as restore_module
from walship.backup.fetch import parse_tablespace_mapping
from walship.backup.push import push_backup
from walship.backup.restore import (RecoveryTarget, make_target, recovery_settings, restore,
                                    rewrite_auto_conf)
from walship.cli import run
from walship.codec import Codec
from walship.errors import UsageError
from walship.storage import open_storage

SEG = "000000010000000000000002"


@pytest.fixture
def backed_up(file_repo_env, tmp_path) -> Path:
    """The file:// repository of ``file_repo_env`` holding one complete, restorable backup
    (so that a restore not refused would go ahead and write)."""
    archive = Archive(open_storage(f"file://{file_repo_env}"), Codec())
    data, ts = make_cluster(tmp_path / "cluster")
    push_wal_names(archive, [SEG])
    push_backup(archive, FakeSource(data, ts))
    return file_repo_env


def refused(argv: list[str], capsys) -> str:
    """Run ``argv``; it must exit 2 with one line: what, why/hint. Return that line."""
    assert run(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n"), captured.err
    assert "ERROR" in captured.err and "(hint: " in captured.err, captured.err
    assert "internal error" not in captured.err
    return captured.err


# -- recovery targets ---------------------------------------------------------------------------
@pytest.mark.parametrize("option, value", [
    ("--target-name", ""),  # empty: was silently "no target", replaying everything
    ("--target-time", ""),
    ("--target-xid", ""),
    ("--target-lsn", ""),
    ("--target-name", "before\nrestore_command = 'sh -c evil'"),
    ("--target-name", "a\rb"),
    ("--target-name", "tab\there"),
    ("--target-name", "esc\x1b[31m"),
    ("--target-name", "caf\u00e9"),
    ("--target-name", "a\u2028b"),
    ("--target-name", "n" * 64),  # PostgreSQL's restore point names: 63 bytes at most
    ("--target-xid", "010"),  # PostgreSQL would read it as octal 8
    ("--target-xid", "0x1f"),
    ("--target-xid", "-5"),
    ("--target-xid", " 771"),
    ("--target-xid", "771\n"),
    ("--target-xid", "2"),  # not a normal transaction id
    ("--target-xid", str(1 << 64)),
    ("--target-lsn", "1/2\n"),
    ("--target-lsn", "1/123456789"),
    ("--target-time", "2026-11-25 14:30:00+00\nx = 1"),
    ("--target-time", "yesterday"),
    ("--target-time", "9999-12-31T23:59:59-01:00"),  # past year 9999 in UTC
])
def test_restore_refuses_a_bad_target_and_writes_nothing(backed_up, tmp_path, capsys, option,
                                                         value):
    target = tmp_path / "restored"
    line = refused(["restore", option, value, str(target), "--tablespace-map",
                    f"16400={tmp_path / 'ts2'}"], capsys)
    assert "target" in line
    assert not target.exists() and not (tmp_path / "ts2").exists()


def test_restore_refuses_two_targets_even_if_one_is_empty(backed_up, tmp_path, capsys):
    line = refused(["restore", "--target-name", "", "--target-xid", "771", str(tmp_path / "r"),
                    "--tablespace-map", f"16400={tmp_path / 'ts2'}"], capsys)
    assert "at most one recovery target" in line
    assert not (tmp_path / "r").exists()


def test_a_target_built_by_hand_is_checked_too():
    for kind, value in (("name", "a\nb"), ("name", ""), ("xid", "010"), ("bogus", "x"),
                        ("time", "2026-11-25")):
        with pytest.raises(UsageError):
            RecoveryTarget(kind, value)
    with pytest.raises(UsageError, match="time zone"):
        RecoveryTarget("time", "x", time=datetime(2026, 11, 25, 14, 30))
    assert RecoveryTarget("name", "it's").settings() == {"recovery_target_name": "it's"}


def test_backup_names_with_a_newline_are_no_backup_names(backed_up, tmp_path, capsys):
    name = restore_module.catalog.list_backups(
        Archive(open_storage(f"file://{backed_up}"), Codec()))[0].name
    assert layout.is_backup_name(name) and not layout.is_backup_name(name + "\n")
    assert "is not a backup name" in refused(
        ["restore", str(tmp_path / "r"), "--backup", name + "\n", "--tablespace-map",
         f"16400={tmp_path / 'ts2'}"], capsys)
    assert not (tmp_path / "r").exists()


def test_target_values_accepted_at_the_limits():
    assert make_target(name="n" * 63).value == "n" * 63
    assert make_target(name="it's a \\ point").value == "it's a \\ point"
    assert make_target(xid="3").value == "3"
    assert make_target(xid=str((1 << 64) - 1)).value == str((1 << 64) - 1)
    assert make_target(lsn="16/b374d848").settings() == {"recovery_target_lsn": "16/B374D848"}
    assert make_target(time="2026-11-25T14:30:00+01:00").settings() == {
        "recovery_target_time": "2026-11-25 13:30:00.000000+00"}
    with pytest.raises(UsageError, match="empty target name"):
        make_target(name="")


def test_settings_are_quoted_and_the_header_has_no_user_text(tmp_path):
    settings = recovery_settings(make_target(name="it's \\ here"), "promote",
                                 ["/opt/my walship/it's 100%/walship"])
    assert settings["recovery_target_name"] == "'it''s \\\\ here'"
    assert settings["restore_command"] == (
        "'''/opt/my walship/it''\"''\"''s 100%%/walship'' wal-fetch %f %p'")
    with pytest.raises(UsageError, match="control character"):
        restore_module.quote_setting("a\nb")
    with pytest.raises(UsageError, match="invalid target action"):
        recovery_settings(make_target(), "promote\nx", ["/w"])


def test_restore_header_names_no_user_value(tmp_path):
    (tmp_path / "repo").mkdir()
    archive = Archive(open_storage(f"file://{tmp_path / 'repo'}"), Codec())
    data, ts = make_cluster(tmp_path / "cluster")
    push_wal_names(archive, [SEG])
    push_backup(archive, FakeSource(data, ts))
    target = tmp_path / "r"
    restore(archive, target, make_target(name="secret-ish point"),
            tablespace_map={16400: str(tmp_path / "ts2")}, command=["/w"])
    conf = (target / "postgresql.auto.conf").read_text()
    comments = [line for line in conf.splitlines() if line.startswith("#")]
    assert any("walship restore of backup" in line for line in comments)
    assert not any("secret-ish" in line for line in comments)
    assert "recovery_target_name = 'secret-ish point'" in conf


# -- the directory --------------------------------------------------------------------------
def test_restore_refuses_an_empty_directory_argument(backed_up, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "" would have meant this directory
    before = sorted(os.listdir(tmp_path))
    for command in ("restore", "backup-fetch"):
        argv = [command, "", "--force"] if command == "restore" else \
            [command, "LATEST", "", "--force"]
        assert "no data directory given" in refused(argv, capsys)
    assert sorted(os.listdir(tmp_path)) == before


def test_restore_refuses_a_directory_under_a_file(backed_up, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.write_text("x")
    remap = ["--tablespace-map", f"16400={tmp_path / 'ts2'}"]
    for argv in (["restore", str(plain / "x" / "data")],
                 ["backup-fetch", "LATEST", str(plain / "x")],
                 ["restore", str(plain)]):  # the file itself
        assert "is not a directory" in refused(argv + remap, capsys)
    assert plain.read_text() == "x" and not (tmp_path / "ts2").exists()
    # a tablespace location under a file
    line = refused(["restore", str(tmp_path / "r"), "--tablespace-map", f"16400={plain}/ts"],
                   capsys)
    assert "tablespace 16400 location" in line and "is not a directory" in line
    assert not (tmp_path / "r").exists()


def test_a_directory_that_cannot_be_created_is_a_usage_error(backed_up, tmp_path, capsys):
    for argv in (["restore", "/proc/walship-test/data", "--tablespace-map",
                  f"16400={tmp_path / 'ts2'}"],
                 ["restore", str(tmp_path / "r"), "--tablespace-map",
                  "16400=/proc/walship-test/ts"]):
        assert "cannot create" in refused(argv, capsys)
    assert not (tmp_path / "r").exists() and not (tmp_path / "ts2").exists()


def test_empty_backup_name_and_occupied_tablespace(backed_up, tmp_path, capsys):
    assert "is not a backup name" in refused(
        ["restore", str(tmp_path / "r"), "--backup", "", "--tablespace-map",
         f"16400={tmp_path / 'ts2'}"], capsys)
    # the tablespace's original location is not empty: --force does not apply there
    line = refused(["restore", str(tmp_path / "r"), "--force"], capsys)
    assert "tablespace 16400 location" in line and "--tablespace-map" in line
    assert "--force" not in line
    assert not (tmp_path / "r").exists()


def test_force_never_empties_an_arbitrary_directory(backed_up, tmp_path, capsys):
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    (home / "sub" / "PG_VERSION").write_text("15\n")  # not at the top: does not count
    for argv in (["restore", str(home), "--force"],
                 ["backup-fetch", "LATEST", str(home), "--force"]):
        line = refused(argv + ["--tablespace-map", f"16400={tmp_path / 'ts2'}"], capsys)
        assert "not a PostgreSQL data directory" in line
    assert (home / "notes.txt").read_text() == "mine"
    # a PG_VERSION that is a link, or without global/, does not make a data directory either
    os.symlink(home / "sub" / "PG_VERSION", home / "PG_VERSION")
    (home / "global").mkdir()
    refused(["restore", str(home), "--force"], capsys)
    assert (home / "notes.txt").read_text() == "mine"


def test_force_replaces_a_data_directory_without_following_links(backed_up, tmp_path, capsys):
    old = tmp_path / "old"
    (old / "global").mkdir(parents=True)
    (old / "PG_VERSION").write_text("15\n")
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "precious").write_text("keep")
    os.symlink(outside, old / "pg_tblspc_link")  # links inside are removed, not followed
    os.symlink(outside / "deep", old / "global" / "dirlink")
    assert run(["restore", str(old), "--force", "--tablespace-map",
                f"16400={tmp_path / 'ts2'}"]) == 0
    assert (outside / "deep" / "precious").read_text() == "keep"
    assert not os.path.lexists(old / "pg_tblspc_link")
    assert (old / "recovery.signal").exists()
    # a previous walship restore is replaced again
    assert run(["restore", str(old), "--force", "--tablespace-map",
                f"16400={tmp_path / 'ts3'}"]) == 0
    # an interrupted one (its marker) too
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / ".walship-incomplete").write_text("walship backup-fetch x\n")
    (interrupted / "base").mkdir()
    assert run(["backup-fetch", "LATEST", str(interrupted), "--force", "--tablespace-map",
                f"16400={tmp_path / 'ts4'}"]) == 0
    capsys.readouterr()


def test_check_directory_refuses_a_symlinked_directory(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(UsageError, match="not a directory"):
        fetch.check_directory(tmp_path / "link", force=True)
    assert fetch.check_directory(tmp_path / "new" / "data") == tmp_path / "new" / "data"


# -- tablespace maps --------------------------------------------------------------------------
@pytest.mark.parametrize("values, why", [
    ([""], "no '='"),
    (["16400"], "no '='"),
    (["abc={t}/x"], "not a number"),
    (["={t}/x"], "not a number"),
    (["0={t}/x"], "not a number"),
    (["-1={t}/x"], "not a number"),
    (["4294967296={t}/x"], "not a number"),
    (["\u0661={t}/x"], "not a number"),  # an Arabic-Indic digit, which int() accepts
    (["16400="], "empty"),
    (["16400=relative/path"], "not absolute"),
    (["16400={t}/a\nb"], "control character"),
    (["16400={t}/a", "16400={t}/b"], "mapped twice"),
    (["16400={t}/a", "16401={t}/a/"], "two tablespaces are mapped to"),
])
def test_bad_tablespace_maps_are_refused(backed_up, tmp_path, capsys, values, why):
    values = [value.replace("{t}", str(tmp_path / "spaces")) for value in values]
    with pytest.raises(UsageError, match=why):
        parse_tablespace_mapping(values)
    options = [arg for value in values for arg in ("--tablespace-map", value)]
    target = tmp_path / "restored"
    for argv in (["restore", str(target)], ["backup-fetch", "LATEST", str(target)]):
        assert "tablespace" in refused(argv + options, capsys)
    assert not target.exists() and not (tmp_path / "spaces").exists()


def test_good_tablespace_map():
    assert parse_tablespace_mapping(["16400=/srv/ts/", "16401=/srv//other"]) == {
        16400: "/srv/ts", 16401: "/srv/other"}


# -- numeric options ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["delete", "--retain-days", "nan"],
    ["delete", "--retain-days", "inf"],
    ["delete", "--retain-days", "1e300"],
    ["delete", "--retain-full", "1", "--incomplete-grace", "inf"],
    ["delete", "--retain-full", "1", "--incomplete-grace", "nan"],
    ["delete", "--retain-full", "1", "--incomplete-grace", "1e300"],
    ["backup-push", "--wal-timeout", "nan"],
    ["backup-push", "--wal-timeout", "inf"],
    ["wal-verify", "--wal-segment-size", "0"],  # (was an internal ValueError)
    ["wal-verify", "--wal-segment-size", "3"],
    ["wal-verify", "--wal-segment-size", "2048"],
])
def test_nan_and_infinity_are_refused(file_repo_env, capsys, argv):
    line = refused(argv, capsys)
    assert argv[-2] in line or argv[-1] in line


# -- wal-fetch into a directory -------------------------------------------------------------------
def test_wal_fetch_into_a_directory_is_a_usage_error(file_repo_env, tmp_path, capsys,
                                                     monkeypatch):
    monkeypatch.setenv("WALSHIP_PREFETCH", "0")  # (so that no prefetch worker is started)
    (file_repo_env / "wal").mkdir()
    archive = Archive(open_storage(f"file://{file_repo_env}"), Codec())
    (tmp_path / "src").mkdir()  # (a push keeps its repository verdict beside the WAL file)
    source = tmp_path / "src" / SEG
    source.write_bytes(bytes(1 << 20))
    archive.push_wal(source)
    directory = tmp_path / "pg_wal"
    directory.mkdir()
    line = refused(["wal-fetch", SEG, str(directory)], capsys)
    assert "is a directory" in line
    assert os.listdir(directory) == [] and sorted(os.listdir(tmp_path)) == ["pg_wal", "repo",
                                                                             "src"]
    # inside restore_command, a usage error aborts recovery (128 + 2), still one line
    assert run(["wal-fetch", SEG, str(directory)], recovery=True) == 130
    assert capsys.readouterr().err.count("\n") == 1
    refused(["wal-fetch", SEG, ""], capsys)


# -- against a real PostgreSQL -----------------------------------------------------------------
def test_postgresql_reads_back_exactly_what_restore_wrote(pg, tmp_path):
    """PostgreSQL's own parser (postgres -C, which reads postgresql.auto.conf and runs each
    setting's check, without starting a server) reads the restore point name, the time, and
    restore_command, quoted by restore, back as given; and refuses the name one byte longer
    than restore allows, which is why restore refuses it."""
    (tmp_path / "repo").mkdir()
    archive = Archive(open_storage(f"file://{tmp_path / 'repo'}"), Codec())
    data, ts = make_cluster(tmp_path / "cluster")
    push_wal_names(archive, [SEG])
    push_backup(archive, FakeSource(data, ts))
    name = "it's a \\ 'quoted' \"point\"; x=1 # not a comment"
    walship = "/opt/my walship/it's 100%p/walship"
    restored = pg.make_dir(pg.path / "restored", 0o700)
    restore(archive, restored, make_target(name=name), command=[walship], archive_mode_off=True,
            tablespace_map={16400: str(pg.make_dir(pg.path / "ts", 0o700))})
    (restored / "postgresql.conf").write_text("")
    chown_to(restored / "postgresql.conf", pg.user)

    def show(setting: str, directory: Path = restored, check: bool = True) -> str:
        proc = pg.run_pg([str(pg.bindir / "postgres"), "-C", setting, "-D", str(directory)],
                         check=check)
        return proc.stdout[:-1] if proc.returncode == 0 else ""

    assert show("recovery_target_name") == name
    assert show("archive_mode") == "off"
    command = show("restore_command")
    # what PostgreSQL then runs, by its rules (%f, %p, %r, %% replaced, left to right), split
    # by the shell
    ran = re.sub(r"%([fpr%])", lambda m: {"f": "F", "p": "P", "r": "R", "%": "%"}[m[1]],
                 command)
    assert shlex.split(ran) == [walship, "wal-fetch", "F", "P"]
    # the time, LSN and xid, as restore normalises them, are read by PostgreSQL's checks
    other = pg.make_dir(pg.path / "other", 0o700)
    (other / "postgresql.conf").write_text("")
    for target, setting, value in (
            (make_target(time="2026-11-25T14:30:00.25+01:00"), "recovery_target_time",
             "2026-11-25 13:30:00.250000+00"),
            (make_target(lsn="16/b374d848"), "recovery_target_lsn", "16/B374D848"),
            (make_target(xid=str((1 << 33) + 5)), "recovery_target_xid", str((1 << 33) + 5)),
            (make_target(name="n" * 63), "recovery_target_name", "n" * 63)):
        (other / "postgresql.auto.conf").write_text(rewrite_auto_conf(
            "", recovery_settings(target, "pause", ["/w"]), "walship restore"))
        assert show(setting, other) == value, setting
    (other / "postgresql.auto.conf").write_text(
        f"recovery_target_name = {restore_module.quote_setting('n' * 64)}\n")
    assert show("recovery_target_name", other, check=False) == ""  # PostgreSQL refuses 64
