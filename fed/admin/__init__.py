"""fed's admin surface: the control API, queue administration behind it and the
``fed queue`` command. Imports delivery, routing, queue and telemetry."""
