"""gputorrent: torrent-style volunteer compute for language models.

Peers donate a GPU or CPU (``gputorrent serve``); anyone asks the swarm
(``gputorrent ask``); tokens stream straight from the chosen peer over signed channels.
"""

__version__ = "0.1.0"
