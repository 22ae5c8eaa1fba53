"""The data layer's error: a bad spec, file or value, said in one line with the fix."""

__all__ = ["DataError"]


class DataError(ValueError):
    """A bad data spec, file or value; the message is one line naming the problem and the fix."""
