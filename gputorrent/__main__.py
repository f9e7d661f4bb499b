"""``python -m gputorrent``: the same as the ``gputorrent`` command."""

from .cli import entry

entry()
