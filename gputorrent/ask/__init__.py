"""The asking half: choosing peers, one verified attempt, failover, chains of shards, spot
checks, and fetching a model file from its seeders. Imports nothing from ``serve``."""
