"""What every search space shares: its error type."""


class ArchError(ValueError):
    """A malformed or unbuildable architecture, with a message naming the problem."""
