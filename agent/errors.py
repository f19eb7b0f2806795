"""Typed errors whose messages name the file or value at fault (one line each)."""


class DistillError(ValueError):
    """Base class: bad input detected by the library."""


class CheckpointError(DistillError):
    """A file is missing, not a checkpoint, truncated, or does not form a TD-MPC2 model."""


class ConfigError(DistillError):
    """An impossible or unknown setting."""
