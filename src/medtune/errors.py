"""User-facing errors: the CLI prints one line and exits with code 2 (no traceback unless --debug)."""

from __future__ import annotations


class MedtuneError(Exception):
    """An error caused by the user's input or environment, with a message that says where."""

    exit_code = 2


class DataError(MedtuneError):
    """Bad input data: the message names the file, row and/or field."""


class ConfigError(MedtuneError):
    """Bad configuration: the message names the key or file."""
