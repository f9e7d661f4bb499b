"""The resident agent: one presence in the swarm per user and machine, and the thin commands
that use it.

``gputorrent agent`` (started by the first command that needs the swarm) holds the requester
identity, the DHT node and its routing table, the warm view of adverts and pongs, open
connections, reputation, breakers and the ledger. ``ask`` and ``peers`` send it a request over a
unix socket and print what comes back, without importing trio or py-libp2p: a warm ask costs a
Python start and a round trip, not a join. ``paths``, ``protocol`` and ``client`` are stdlib
only for that reason; ``server`` and ``ops`` run inside the agent (and ``ops`` in-process too, for
``--no-agent``, so both paths print the same).
"""
