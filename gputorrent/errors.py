"""The one base of every error gputorrent raises on purpose.

``except GputorrentError`` catches what the program means to report (a message that says what
to do); anything else is a bug. The subclasses live beside the code that raises them.
"""


class GputorrentError(Exception):
    """Base of gputorrent's own errors; the message is meant for a person."""
