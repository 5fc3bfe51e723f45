"""The engine: FLUX.1 Fill [dev] with the hosted flux-fill-dev input semantics. No HTTP in here."""

__version__ = "0.1.0"
