"""fed's routing: the directory (address -> physical mailbox), holds, the shared database
several nodes agree through, the node registry and agent, address parsing. Imports queue
(the node's store) and telemetry."""
