"""The serving half: a node's life (DHT, announces, reachability), the infer and shard servers,
the model file's seeder, the device it runs on. Imports nothing from ``asking``."""
