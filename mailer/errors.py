"""The domain's errors, and the one way a pydantic error becomes one line.

Domain code says *what* went wrong (a record that does not exist, a state that
forbids the request, input a person can fix); it never picks an HTTP status.
The web layer maps these classes to 404/409/422 in one table
(``mailer.web.deps.STATUS_FOR``); the CLI prints the message on one line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol


class MailerError(Exception):
    """Base of every error the domain raises on purpose; ``message`` is safe to show."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(MailerError):
    """The record asked for does not exist (or no longer does)."""


class Conflict(MailerError):
    """The record exists, but its current state forbids the request."""


class Invalid(MailerError, ValueError):
    """Input a person can fix; ``field`` names it and ``message`` says what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ValidationErrors(Protocol):
    """pydantic's ValidationError, or FastAPI's RequestValidationError: a list of errors."""

    def errors(self) -> Sequence[Any]: ...


def one_line(
    error: ValidationErrors,
    *,
    first: bool = False,
    where: Callable[[Sequence[str]], str] = ".".join,
    repeat_field: bool = True,
    raw: bool = False,
) -> str:
    """Pydantic's errors as one line: ``where: what; where: what``.

    ``where`` turns an error's location into the name shown (a field path, an
    environment variable); ``first`` keeps only the first error. pydantic prefixes
    messages raised by validators with "Value error, ", which is dropped unless
    ``raw``. With ``repeat_field`` off, a message that already starts with the field
    name is not prefixed with it again.
    """
    parts = []
    for err in error.errors()[:1] if first else error.errors():
        msg = str(err.get("msg", "invalid"))
        if not raw:
            msg = msg.removeprefix("Value error, ")
        name = where([str(p) for p in err.get("loc", ())])
        if name and (repeat_field or not msg.startswith(name)):
            parts.append(f"{name}: {msg}")
        else:
            parts.append(msg)
    return "; ".join(parts)
