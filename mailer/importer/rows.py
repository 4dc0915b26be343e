"""One CSV row to a validated subscriber record, with the status it would be imported in.

Validation is the web form's (``normalize_email``, ``normalize_name``), so an
import can hold nothing a visitor could not have typed; the consent columns get
the same limits as the table.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mailer.models import SubscriberStatus
from mailer.subscriptions import (
    MAX_EMAIL_LENGTH,
    InvalidInput,
    has_control,
    normalize_email,
    normalize_name,
)

FIELD_LIMITS = {"consent_ip": 64, "consent_source": 200}
TIMESTAMPS = ("consent_at", "created_at", "confirmed_at", "unsubscribed_at")
STATUSES = tuple(s.value for s in SubscriberStatus)


@dataclass(frozen=True)
class ImportOptions:
    confirmed: bool = False
    consent_source: str | None = None
    dry_run: bool = False
    allow_suppressed: bool = False


@dataclass
class Row:
    """One valid row; ``status`` is the status a new subscriber would get."""

    line: int
    email: str
    name: str | None
    status: str
    consent_source: str | None = None
    consent_ip: str | None = None
    times: dict[str, datetime] = field(default_factory=dict)


def _text(value: str, column: str) -> str | None:
    value = value.strip()
    if not value:
        return None
    if len(value) > FIELD_LIMITS[column]:
        raise InvalidInput(column, f"is longer than {FIELD_LIMITS[column]} characters")
    if has_control(value):
        raise InvalidInput(column, "must not contain control characters or line breaks")
    return value


def _timestamp(value: str, column: str) -> datetime | None:
    value = value.strip()
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(column, f"{value[:40]!r} is not an ISO 8601 date/time") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


# RFC 5322 dot-atom in plain ASCII: a local part email_validator always accepts as it is.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")


class EmailNormalizer:
    """``normalize_email`` with the domain's verdict remembered, for a file's worth of rows.

    Full validation costs tens of microseconds, most of it on the domain, and a list
    holds few distinct domains. An address whose domain already passed and whose local
    part is a plain dot-atom gets the same answer without asking again; anything else
    (quoted, non-ASCII, unknown domain, too long) goes through ``normalize_email``.
    """

    def __init__(self) -> None:
        self.domains: dict[str, str] = {}

    def __call__(self, raw: str) -> str:
        text = raw.strip()
        local, _, domain = text.rpartition("@")
        known = self.domains.get(domain)
        if known is not None and len(local) <= 64 and _DOT_ATOM.match(local):
            address = f"{local}@{known}".lower()
            if len(address) <= MAX_EMAIL_LENGTH:
                return address
        address = normalize_email(raw)
        self.domains[domain] = address.rpartition("@")[2]
        return address


def parse_row(
    line: int, get: Callable[[str], str], opts: ImportOptions, email_of: Callable[[str], str]
) -> Row:
    """Validate one row and decide the status a new subscriber would get."""
    email = email_of(get("email"))
    name = normalize_name(get("name"))
    status = get("status").strip().lower() or None
    if status is not None and status not in STATUSES:
        raise InvalidInput("status", f"{status[:20]!r} is not one of {', '.join(STATUSES)}")
    times = {c: t for c in TIMESTAMPS if (t := _timestamp(get(c), c)) is not None}
    source = _text(get("consent_source"), "consent_source")
    ip = _text(get("consent_ip"), "consent_ip")
    status = status or (SubscriberStatus.confirmed if opts.confirmed else SubscriberStatus.pending)
    if status == SubscriberStatus.confirmed:
        # Confirmed means consent given: the row or the operator must say where it came from.
        source = source or opts.consent_source
        if source is None and "consent_at" not in times:
            raise InvalidInput(
                "status",
                "confirmed needs a consent record (consent_at or consent_source column, "
                "or --confirmed --consent-source)",
            )
    return Row(line, email, name, status, source or None, ip, times)
