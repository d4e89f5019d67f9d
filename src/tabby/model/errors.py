"""Errors raised by the model. Every message names the object and the offending field path."""

from __future__ import annotations


class ValidationError(Exception):
    """An object failed validation.

    ``str(err)`` is one line, such as
    ``Service default/web: spec.ports[0].port: must be an integer 1-65535``.
    ``path`` is the field path alone (``spec.ports[0].port``), or None when the object as a whole
    is at fault.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class UnknownKind(ValidationError):
    """A kind name (from a manifest or the CLI) that tabby does not know."""


class FieldError(Exception):
    """Internal to the schema walk: a field path and what is wrong there.

    validate() turns it into a ValidationError prefixed with the object's reference.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message
