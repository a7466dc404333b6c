"""User-facing errors: one clear line, exit code 2, no traceback."""

from __future__ import annotations


class HevisumError(Exception):
    """An error caused by the user's input (file, field, value or option).

    The message is a single line naming what is wrong, where, and what would be valid.
    The CLI prints it as ``error: <message>`` and exits with code 2.
    """

    exit_code = 2
