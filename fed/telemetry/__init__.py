"""fed's telemetry: Prometheus metrics and the log format. Imports nothing from fed."""
