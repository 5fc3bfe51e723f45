"""Benchmarks that print figures (see bench/README.md); each runs as a script, `python bench/<name>.py`."""
