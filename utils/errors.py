"""The error types that mean "the input cannot work", as opposed to a bug.

`UserError` is a problem with what the user gave (flags, files, data) whose message is already the one line
to show. `SettingError` is the library's way to say that one setting's value cannot work: it carries the
settings field (`field`, e.g. "image_encoder"), the value, and a message that names no command-line flag.
How a field is spelled to the user (a flag, a TOML key) is the programs' business: `utils.cli.run_cli` prints
``error: --FIELD: MESSAGE``. The library code below the programs raises these and never words a flag.
"""
from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A problem with the user's input (flags, files, data) that deserves a one-line message."""


class SettingError(UserError, ValueError):
    """The value of the setting `field` cannot work; `see_also` names other fields that take part (e.g. the
    encoder, for an image size it cannot take). str() is the message alone, without any flag or key."""

    def __init__(self, field: str, value: Any, message: str, see_also: tuple[str, ...] = ()):
        super().__init__(field, value, message, tuple(see_also))
        self.field = field
        self.value = value
        self.message = message
        self.see_also = tuple(see_also)

    def __str__(self) -> str:
        return self.message
