"""The one exception type that reaches the user as a one-line message."""


class UserError(Exception):
    """Bad input the user can fix. The CLI prints ``error: <message>`` and exits 2."""
