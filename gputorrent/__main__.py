"""``python -m gputorrent``: the same as the ``gputorrent`` command."""

import sys

from .cli import main

sys.exit(main())
