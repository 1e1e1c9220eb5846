"""tmrl relay service."""

__version__ = "0.1.0"
