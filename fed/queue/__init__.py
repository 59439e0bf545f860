"""fed's queue: the spool files, their format, the group commit that makes acceptance
durable, and the node-local SQLite store of per-recipient state. Imports only telemetry."""
