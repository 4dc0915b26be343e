"""What the web routers share: editor authentication, path types and error statuses.

Routers never import each other; whatever two of them need lives here.
"""

from __future__ import annotations

from mailer.errors import Conflict, Invalid, MailerError, NotFound

# The one map from domain errors to HTTP statuses; the domain never picks a status.
STATUS_FOR: dict[type[MailerError], int] = {NotFound: 404, Conflict: 409, Invalid: 422}


def status_for(exc: MailerError) -> int:
    """The HTTP status for a domain error (its nearest mapped class; 400 if none)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR:
            return STATUS_FOR[cls]  # type: ignore[index]
    return 400
