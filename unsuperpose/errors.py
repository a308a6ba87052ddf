"""The one exception type users see: a message that says what went wrong and what to do.

Only the command layer raises it (``commands/``, and the shared modules of the core).
The stage libraries (lm, harvest, toy, train, analyze) raise ordinary exceptions of their own
(ValueError subclasses such as ``harvest.StoreError``) in their own terms; a command turns them
into a UserError that names its flags (``unsuperpose.commands.errors.stage_errors``).
"""


class UserError(Exception):
    """Bad input or state the user can fix; the CLI prints it without a traceback and exits 2."""
