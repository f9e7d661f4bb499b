"""The network layer: a py-libp2p host with this project's workarounds (dial deadlines, whole
yamux frames, dead-connection handling). Everything above it (the DHT, peers, the API) uses
it; it imports nothing of theirs."""
