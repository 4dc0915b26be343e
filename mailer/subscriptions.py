"""The subscriber lifecycle: subscribe → (confirm) → unsubscribe, and bounces.

Every transition is a single short transaction that also appends an event, so
``subscriber_events`` is the proof of consent and of every opt-out. Replies to
the visitor never reveal whether an address was already known (docs/design.md, invariant 8).
Who left stays gone: a sign-up of an unsubscribed or bounced address only records
the request beside the row, and nothing but a click on a confirmation link mailed
after the latest unsubscribe or bounce brings the person back (docs/security.md).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from mailer.db import utcnow
from mailer.driver_sql import driver_connection
from mailer.errors import Invalid
from mailer.models import Subscriber, SubscriberEvent, SubscriberStatus
from mailer.signup_statements import (
    ASKED_AGAIN,
    CLAIM,
    EVENT,
    FIND,
    PG_SIGNUP,
    SQLITE_NEW,
    pg_signup_for,
)
from mailer.tokens import ConfirmClaim, TokenError

MAX_EMAIL_LENGTH = 254
MAX_NAME_LENGTH = 200
LEFT = (SubscriberStatus.unsubscribed, SubscriberStatus.bounced)
MAX_SOURCE_LENGTH = 200  # subscribers.consent_source
SOURCE_MARK = "source: "  # how a sign-up event's detail names the page signed up on


class InvalidInput(Invalid):
    """Input a visitor can fix; ``field`` and the message are shown to them."""


def has_control(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text)


def normalize_email(raw: object) -> str:
    """Validate and normalize an address; raise InvalidInput saying what is wrong."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidInput("email", "an email address is required")
    text = raw.strip()
    if len(text) > MAX_EMAIL_LENGTH:
        raise InvalidInput("email", f"is longer than {MAX_EMAIL_LENGTH} characters")
    if has_control(text) or any(ch.isspace() for ch in text):
        raise InvalidInput("email", "must not contain spaces or control characters")
    try:
        result = validate_email(text, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise InvalidInput("email", str(exc)) from None
    address = (result.ascii_email or result.normalized).lower()
    if len(address) > MAX_EMAIL_LENGTH:
        raise InvalidInput("email", f"is longer than {MAX_EMAIL_LENGTH} characters")
    return address


GMAIL_DOMAINS = ("gmail.com", "googlemail.com")


def canonical_address(email: str) -> str:
    """The mailbox an address reaches, for limits that a spelling must not get around.

    Lower case, the ``+tag`` dropped (most providers deliver ``a+x@`` to ``a@``), and for
    Gmail the dots too (``a.b@gmail.com`` is ``ab@gmail.com``; googlemail.com is the same
    service). Only ever a key for counting: mail still goes to the address as given.
    """
    local, _, domain = email.lower().rpartition("@")
    local = local.partition("+")[0] or local
    if domain in GMAIL_DOMAINS:
        local, domain = local.replace(".", "") or local, GMAIL_DOMAINS[0]
    return f"{local}@{domain}"


def normalize_name(raw: object) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise InvalidInput("name", "must be text")
    name = raw.strip()
    if not name:
        return None
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInput("name", f"is longer than {MAX_NAME_LENGTH} characters")
    if has_control(name):
        raise InvalidInput("name", "must not contain control characters or line breaks")
    return name


def clean_source(raw: object) -> str | None:
    """The form's ``source`` (the page signed up on): one line, at most 200 characters.
    A hidden field the visitor cannot fix, so it is cut rather than refused; only a JSON
    value that is not text at all is refused."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise InvalidInput("source", "must be a string")
    text = " ".join("".join(" " if has_control(ch) else ch for ch in raw).split())
    return text[:MAX_SOURCE_LENGTH] or None


def _with_source(detail: str | None, source: str | None) -> str | None:
    if not source:
        return detail
    return f"{detail}; {SOURCE_MARK}{source}" if detail else f"{SOURCE_MARK}{source}"


@dataclass(frozen=True)
class Origin:
    """Where a request came from, recorded with every event."""

    ip: str | None = None
    user_agent: str | None = None
    source: str | None = None

    def event(self, subscriber_id: int, kind: str, detail: str | None = None) -> SubscriberEvent:
        return SubscriberEvent(
            subscriber_id=subscriber_id,
            kind=kind,
            ip=self.ip,
            user_agent=(self.user_agent or "")[:512] or None,
            detail=detail,
        )


class Owed(NamedTuple):
    """A confirmation mail recorded as owed: ``subscribers.confirm_due_at`` of that row."""

    subscriber_id: int
    due_at: datetime


async def subscribe(
    engine: AsyncEngine,
    email: str,
    name: str | None,
    origin: Origin,
    *,
    resend_after_s: int,
    source: str | None = None,
    mail: bool = True,
) -> Owed | None:
    """Record a sign-up, and in the same transaction the confirmation mail it is owed.

    None means "send nothing": ``mail`` is False (a limit in Redis said no), already
    confirmed, a mail is owed already, or one went out less than ``resend_after_s`` ago
    (the cooldown that stops mail bombing a victim). An owed mail is sent by its job or,
    if that job is lost, by the reconciler (``mailer/confirmations.py``).

    Core statements built once (``mailer/signup_statements.py``) on a plain connection,
    no ORM session: a new address is one statement on PostgreSQL (one round trip, its own
    transaction) and one short ``BEGIN IMMEDIATE`` transaction on SQLite; a known address
    takes one transaction (docs/design.md, "The sign-up request").
    """
    now = utcnow()
    values = {
        "p_email": email,
        "p_name": name,
        "p_now": now,
        "p_due": now if mail else None,
        "p_ip": origin.ip,
        "p_ua": (origin.user_agent or "")[:512] or None,
        "p_detail": _with_source(None, source),
    }
    for _attempt in range(2):
        if (new_id := await _insert_new(engine, values)) is not None:
            return Owed(new_id, now) if mail else None
        async with engine.begin() as conn:
            found, owed = await _known(conn, values, source, mail, resend_after_s)
        if found:
            return owed
        # The row was erased between the two: insert again.
    raise RuntimeError("could not record sign-up")  # pragma: no cover


async def _insert_new(engine: AsyncEngine, values: dict[str, Any]) -> int | None:
    """The common case, a new address: its id, or None if the address exists."""
    if engine.dialect.driver == "asyncpg":
        # One statement, outside any transaction (autocommit), on the pool's connection
        # but through asyncpg itself: SQLAlchemy built it (mailer/signup_statements.py).
        statement = pg_signup_for(engine.dialect)
        async with driver_connection(engine) as raw:
            sub_id = await raw.fetchval(statement.sql, *statement.args(values))
    elif engine.dialect.name == "postgresql":
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")  # one statement
            sub_id = (await conn.execute(PG_SIGNUP, values)).scalar()
    else:
        async with engine.begin() as conn:
            sub_id = (await conn.execute(SQLITE_NEW, values)).scalar()
            if sub_id is not None:
                await conn.execute(EVENT, {**values, "p_sid": sub_id, "p_kind": "signup"})
    return None if sub_id is None else int(sub_id)


async def _known(
    conn: AsyncConnection,
    values: dict[str, Any],
    source: str | None,
    mail: bool,
    resend_after_s: int,
) -> tuple[bool, Owed | None]:
    """A sign-up of an address we have: (whether the row was there, the mail it is owed)."""
    row = (await conn.execute(FIND, values)).first()
    if row is None:
        return False, None
    sub_id, status = int(row[0]), row[1]
    event = {**values, "p_sid": sub_id}
    if status == SubscriberStatus.confirmed:
        detail = _with_source("already confirmed", source)
        await conn.execute(EVENT, {**event, "p_kind": "signup_repeat", "p_detail": detail})
        return True, None
    if status in LEFT:
        # Anyone can type an address: the row stays as its owner left it (and keeps its
        # name); the request waits for the owner's own click on the mailed link.
        await conn.execute(ASKED_AGAIN, event)
        detail = _with_source(f"again after {status}; stays {status} until confirmed", source)
        await conn.execute(EVENT, {**event, "p_kind": "signup", "p_detail": detail})
    else:
        detail = _with_source("pending", source)
        await conn.execute(EVENT, {**event, "p_kind": "signup_repeat", "p_detail": detail})
    if not mail:
        return True, None
    now = values["p_now"]
    cutoff = now - timedelta(seconds=resend_after_s)
    claimed = await conn.execute(CLAIM, {**event, "p_cutoff": cutoff})
    return True, (Owed(sub_id, now) if claimed.rowcount == 1 else None)


def left_at(sub: Subscriber) -> datetime | None:
    """When the person last left: the later of their unsubscribe and their bounce."""
    times = [t for t in (sub.unsubscribed_at, sub.bounced_at) if t is not None]
    return max(times) if times else None


async def confirm(session: AsyncSession, claim: ConfirmClaim, origin: Origin) -> Subscriber:
    """Confirm (idempotent). A link older than the latest unsubscribe or bounce no longer
    works, and someone who left comes back only through a re-sign-up's new link."""
    sub = await session.get(Subscriber, claim.subscriber_id, with_for_update=True)
    if sub is None:
        raise TokenError("This confirmation link is not valid.")
    if sub.status == SubscriberStatus.confirmed:
        return sub
    ended = left_at(sub)
    if (ended is not None and claim.issued_at <= ended.timestamp()) or (
        sub.status != SubscriberStatus.pending and sub.resubscribe_requested_at is None
    ):
        raise TokenError("This confirmation link is no longer valid.", expired=True)
    now = utcnow()
    sub.resubscribe_requested_at = sub.confirm_due_at = None
    sub.status = SubscriberStatus.confirmed
    sub.confirmed_at = now
    sub.consent_at = now
    sub.consent_ip = origin.ip
    sub.consent_user_agent = (origin.user_agent or "")[:512] or None
    sub.consent_source = origin.source or "double opt-in"
    if page := await _signed_up_on(session, sub.id):
        sub.consent_source = f"{sub.consent_source} via {page}"[:MAX_SOURCE_LENGTH]
    session.add(origin.event(sub.id, "confirmed"))
    await session.commit()
    return sub


async def _signed_up_on(session: AsyncSession, subscriber_id: int) -> str | None:
    """The page of the latest sign-up that named one (the form's ``source``)."""
    detail = await session.scalar(
        select(SubscriberEvent.detail)
        .where(
            SubscriberEvent.subscriber_id == subscriber_id,
            SubscriberEvent.kind.in_(("signup", "signup_repeat")),
            SubscriberEvent.detail.contains(SOURCE_MARK, autoescape=True),
        )
        .order_by(SubscriberEvent.id.desc())
        .limit(1)
    )
    return detail.partition(SOURCE_MARK)[2] or None if detail else None


async def unsubscribe(
    session: AsyncSession, subscriber_id: int, origin: Origin, how: str
) -> Subscriber:
    """Unsubscribe (idempotent). Committed before we answer, so sending checks see it."""
    sub = await session.get(Subscriber, subscriber_id, with_for_update=True)
    if sub is None:
        raise TokenError("This unsubscribe link is not valid.")
    if sub.status != SubscriberStatus.unsubscribed or sub.resubscribe_requested_at is not None:
        # Also when a re-sign-up is waiting: leaving again voids the links mailed for it.
        sub.status = SubscriberStatus.unsubscribed
        sub.unsubscribed_at = utcnow()
        sub.resubscribe_requested_at = sub.confirm_due_at = None
        session.add(origin.event(sub.id, "unsubscribed", how))
        await session.commit()
    return sub


async def mark_bounced(
    session: AsyncSession, subscriber_ids: list[int], detail: str, at: datetime | None = None
) -> None:
    """Suppress hard-bounced addresses: no further mail of any kind goes to them."""
    if not subscriber_ids:
        return
    when = at or utcnow()
    await session.execute(
        update(Subscriber)
        .where(Subscriber.id.in_(subscriber_ids))
        .where(
            or_(
                Subscriber.status != SubscriberStatus.bounced,
                Subscriber.resubscribe_requested_at.is_not(None),
            )
        )
        .values(
            status=SubscriberStatus.bounced,
            bounced_at=when,
            resubscribe_requested_at=None,
            confirm_due_at=None,
        )
    )
    session.add_all(
        SubscriberEvent(subscriber_id=sid, kind="bounced", detail=detail[:500])
        for sid in subscriber_ids
    )


async def search(
    session: AsyncSession,
    *,
    status: str | None = None,
    contains: str = "",
    limit: int,
    offset: int = 0,
    newest_first: bool = False,
) -> tuple[int, list[Subscriber]]:
    """One page of subscribers, and how many match in all: the API's and the admin's search.

    ``contains`` is matched literally (``%`` and ``_`` are escaped) against the stored,
    lower-case address, so callers pass it lower-cased.
    """
    query = select(Subscriber)
    count = select(func.count()).select_from(Subscriber)
    if status:
        query = query.where(Subscriber.status == status)
        count = count.where(Subscriber.status == status)
    if contains:
        query = query.where(Subscriber.email.contains(contains, autoescape=True))
        count = count.where(Subscriber.email.contains(contains, autoescape=True))
    order = Subscriber.id.desc() if newest_first else Subscriber.id
    total = int(await session.scalar(count) or 0)
    rows = list(await session.scalars(query.order_by(order).limit(limit).offset(offset)))
    return total, rows
