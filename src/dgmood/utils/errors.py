"""Errors that every layer raises and the command line turns into one-line messages."""

__all__ = ["CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint or saved detector is missing, corrupt, or does not match what it is loaded into."""
