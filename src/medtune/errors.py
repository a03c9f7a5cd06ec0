"""User-facing errors: the CLI prints one line and exits with code 2 (no traceback unless --debug)."""

from __future__ import annotations


class MedtuneError(Exception):
    """An error caused by the user's input or environment, with a message that says where."""

    exit_code = 2


class DataError(MedtuneError):
    """Bad input data: the message names the file, row and/or field."""


class ConfigError(MedtuneError):
    """Bad configuration: the message names the key or file."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-blank line of ``exc``'s message (at most ``limit`` characters), or its type
    name when the message is empty (``MemoryError()``): safe for any exception."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__


def describe(exc: BaseException, limit: int = 300) -> str:
    """'TypeName: first line of the message', or 'TypeName' alone for an empty message."""
    name = type(exc).__name__
    line = first_line(exc, limit)
    return name if line == name else f"{name}: {line}"
