"""mover."""
