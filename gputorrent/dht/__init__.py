"""Swarm membership: signed adverts (records.py, pure) and the Kademlia DHT node (node.py)."""
