"""The one exception type users see: a message that says what went wrong and what to do."""


class UserError(Exception):
    """Bad input or state the user can fix; the CLI prints it without a traceback and exits 2."""
