"""The HTTP server: Replicate's predictions contract in front of the engine."""
