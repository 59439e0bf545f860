"""fed's SMTP side: the listener that accepts mail (session, data phase, relay policy,
AUTH, TLS). Imports routing, queue and telemetry; nothing from delivery or admin."""
