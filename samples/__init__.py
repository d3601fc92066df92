"""Sample models for trying bnmove (importable as ``samples.models``)."""
