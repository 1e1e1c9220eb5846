"""Examples that plug into tmrl (importable as ``examples.*`` with the repository root on ``PYTHONPATH``)."""
