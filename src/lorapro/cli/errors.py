"""Errors of the ``lorapro`` command line."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the CLI prints its message as one line and exits with code 2."""
