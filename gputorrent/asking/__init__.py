"""The asking half: choosing peers, one verified attempt, failover, chains of shards, spot
checks, and fetching a model file from its seeders. Imports nothing from ``serving``. (Not
``ask``: that name is the one-line API function, ``gputorrent.ask``.)"""
