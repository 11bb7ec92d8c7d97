"""The error type for problems a user can fix (bad input), reported without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the file, key or layer at fault and says what is expected.

    The CLI prints it and exits with status 2; finished work is never lost because of it.
    """

    exit_code = 2

