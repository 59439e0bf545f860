"""fed's delivery: the scheduler (per-destination queues, retries, bounces) and its own
SMTP/LMTP client. Imports routing, queue and telemetry; nothing from smtp or admin."""
