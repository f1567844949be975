"""``python -m walship``: the same as the ``walship`` command."""

from walship.entry import run

run()
