"""The one error type for user mistakes: the CLI prints `error: <message>` and exits 2 (traceback with --debug).

A `UserError` is a `ValueError`, so library callers that catch ValueError keep working.
"""


class UserError(ValueError):
    """A mistake in the user's input (a file, a field, an option), with a message that names it and the fix."""
