"""The ``walship`` console script: runs the CLI and guarantees the exit-status contract.

Only the standard library is imported before the CLI, so that even a broken installation
(a missing dependency, a syntax error) cannot make ``wal-fetch`` exit with 1, PostgreSQL's
"file not found": inside restore_command every failure, however early, exits above 125.
"""

from __future__ import annotations

import sys

RECOVERY_FAILED = 134  # ExitStatus.RECOVERY_FAILED, repeated so that nothing is imported
FAILED = 6


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    recovery = "wal-fetch" in argv
    try:
        if argv == ["--version"]:  # cheap: the tests ask every walship they run its build id
            from walship.build_id import version_line

            print(version_line())
            return 0
        if len(argv) == 2 and argv[0] == "wal-push" or len(argv) == 3 and argv[0] == "wal-fetch":
            from walship import fastpath  # work done ahead: answer without the full program

            if argv[0] == "wal-push" and fastpath.wal_push(argv[1]):
                return 0
            if argv[0] == "wal-fetch":
                status = fastpath.wal_fetch(argv[1], argv[2])
                if status is not None:
                    return status
        from walship.cli import run

        return run(argv, recovery=recovery)
    except BaseException as error:  # noqa: BLE001 - last line of defence of the contract
        if isinstance(error, SystemExit) and error.code in (0, None) and not recovery:
            return 0
        print(f"walship: ERROR: internal error: {type(error).__name__}: {error}",
              file=sys.stderr, flush=True)
        return RECOVERY_FAILED if recovery else FAILED


def installed_launcher(argv0: str | None = None) -> str:
    """Which ``walship`` command is installed beside the running program (``walship check``
    prints it): the native launcher that setup.py builds where a C compiler works, or this
    Python program under that name."""
    import os

    command = os.path.join(os.path.dirname(os.path.abspath(argv0 or sys.argv[0])), "walship")
    try:
        with open(command, "rb") as handle:
            native = handle.read(4) == b"\x7fELF"
    except OSError:
        return "unknown (no walship command beside this program)"
    if native:
        return "native (delivers prefetched segments without starting Python)"
    return "python (no C compiler at install time: install gcc, then walship again)"


if __name__ == "__main__":
    sys.exit(main())
