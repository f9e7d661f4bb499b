"""The Textual TUI (``gputorrent tui``)."""

from .app import SwarmApp

__all__ = ["SwarmApp"]
