"""One exception type for every mistake a user can make.

A `UserError` carries a message that says what is wrong and what to do. The CLIs print it
without a traceback and exit with status 2; library callers can catch it like any exception.
"""


class UserError(Exception):
    """A problem with the user's input, files, flags or environment (not a bug in this code)."""
