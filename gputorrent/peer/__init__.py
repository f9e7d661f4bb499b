"""Peers: the serving side (server, serve) and the asking side (client, asker) of the mesh."""
