"""``python -m walship``: the same as the ``walship`` command."""

import sys

from walship.entry import main

sys.exit(main())
