"""Data-subject rights: a copy of everything held on one subscriber, and erasure.

Erasure keeps what the service still needs without the person: delivery rows
stay (anonymised) so blast counts do not change, and a keyed hash of the
address goes on the suppression list so a later import cannot silently re-add
someone who asked to be forgotten.

Why a keyed hash (HMAC) and not a plain one: addresses are guessable, so a
plain SHA-256 in a leaked dump could be checked against any list of addresses.
Keyed with a value derived from ``MAILER_SECRET_KEY`` it cannot, without the key.

Key rotation: a hash is made under the key that is current at erase time, and
lookups try every key in ``settings.signing_keys`` (current and
``MAILER_OLD_SECRET_KEYS``). Rotating the secret therefore keeps every
suppression working as long as the old key stays listed in
``MAILER_OLD_SECRET_KEYS``; dropping an old key forgets the suppressions made
under it (hashes cannot be re-keyed without the addresses, which are gone).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from mailer.config import Settings
from mailer.models import (
    Blast,
    Delivery,
    StoredBounce,
    Subscriber,
    SubscriberEvent,
    Suppression,
)

# Domain separation: the HMAC key is derived from the secret, never the secret itself,
# so a suppression hash can never double as (or help forge) a signed token.
_PURPOSE = b"mailer suppression list v1"


@functools.lru_cache(maxsize=16)
def _hash_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), _PURPOSE, hashlib.sha256).digest()


def _digest(secret: str, email: str) -> str:
    return hmac.new(_hash_key(secret), email.strip().lower().encode(), hashlib.sha256).hexdigest()


def email_hash(settings: Settings, email: str) -> str:
    """The suppression hash of a normalized address under the current key (hex)."""
    return _digest(settings.signing_keys[-1], email)


def email_hashes(settings: Settings, email: str) -> list[str]:
    """The hashes under every key still accepted, current first, so rotation loses nothing."""
    return [_digest(key, email) for key in reversed(settings.signing_keys)]


async def suppressed_addresses(
    db: AsyncConnection | AsyncSession, settings: Settings, emails: Iterable[str]
) -> set[str]:
    """Which of ``emails`` (normalized) are on the suppression list, in one query."""
    by_hash: dict[str, str] = {}
    for email in emails:
        for digest in email_hashes(settings, email):
            by_hash[digest] = email
    if not by_hash:
        return set()
    found: set[str] = set()
    hashes = list(by_hash)
    # Bounded IN lists: every key multiplies the parameters per address.
    for start in range(0, len(hashes), 5000):
        rows = await db.execute(
            select(Suppression.email_hash).where(
                Suppression.email_hash.in_(hashes[start : start + 5000])
            )
        )
        found.update(by_hash[h] for (h,) in rows)
    return found


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


async def export_subscriber(session: AsyncSession, subscriber_id: int) -> dict[str, Any] | None:
    """Everything held on one subscriber, JSON-ready (the right of access); None if unknown."""
    sub = await session.get(Subscriber, subscriber_id)
    if sub is None:
        return None
    events = await session.scalars(
        select(SubscriberEvent)
        .where(SubscriberEvent.subscriber_id == subscriber_id)
        .order_by(SubscriberEvent.id)
    )
    deliveries = await session.scalars(
        select(Delivery).where(Delivery.subscriber_id == subscriber_id).order_by(Delivery.id)
    )
    bounces = await session.scalars(
        select(StoredBounce)
        .where(StoredBounce.subscriber_id == subscriber_id)
        .order_by(StoredBounce.id)
    )
    return {
        "id": sub.id,
        "email": sub.email,
        "name": sub.name,
        "status": sub.status,
        "created_at": _iso(sub.created_at),
        "updated_at": _iso(sub.updated_at),
        "confirmed_at": _iso(sub.confirmed_at),
        "unsubscribed_at": _iso(sub.unsubscribed_at),
        "bounced_at": _iso(sub.bounced_at),
        "confirm_sent_at": _iso(sub.confirm_sent_at),
        "resubscribe_requested_at": _iso(sub.resubscribe_requested_at),
        "consent": {
            "at": _iso(sub.consent_at),
            "ip": sub.consent_ip,
            "user_agent": sub.consent_user_agent,
            "source": sub.consent_source,
        },
        "events": [
            {
                "kind": e.kind,
                "at": _iso(e.at),
                "ip": e.ip,
                "user_agent": e.user_agent,
                "detail": e.detail,
            }
            for e in events
        ],
        "deliveries": [
            {
                "blast_id": d.blast_id,
                "status": d.status,
                "attempts": d.attempts,
                "sent_at": _iso(d.sent_at),
                "last_code": d.last_code,
                "last_error": d.last_error,
            }
            for d in deliveries
        ],
        "bounces": [
            {
                "kind": b.kind,
                "blast_id": b.blast_id,
                "received_at": _iso(b.received_at),
                "source": b.source,
                "status": b.status,
                "diagnostic": b.diagnostic,
            }
            for b in bounces
        ],
    }


ERASED = "[erased address]"


async def _scrub_blast_reasons(session: AsyncSession, email: str) -> None:
    """The address out of ``blasts.reason`` in any letter case: relays echo addresses as
    they like (``<Erase.Me@EXAMPLE.org>``), and SQL's REPLACE matches case only."""
    found = await session.execute(
        select(Blast.id, Blast.reason).where(
            func.lower(Blast.reason).contains(email.lower(), autoescape=True)
        )
    )
    pattern = re.compile(re.escape(email), re.IGNORECASE)
    for blast_id, reason in found.all():
        await session.execute(
            update(Blast)
            .where(Blast.id == blast_id)
            .values(reason=pattern.sub(ERASED, reason or ""))
        )


async def erase_subscriber(session: AsyncSession, settings: Settings, subscriber_id: int) -> bool:
    """Erase one subscriber's personal data in one transaction (commits); False if unknown.

    Besides the subscriber row and its events, the address can hide in SMTP
    replies the relay echoed back (``deliveries.last_error``, ``blasts.reason``),
    so those are scrubbed too. Delivery rows are detached explicitly instead of
    relying on ON DELETE SET NULL, which SQLite enforces only with foreign keys on.
    """
    sub = await session.get(Subscriber, subscriber_id, with_for_update=True)
    if sub is None:
        await session.rollback()
        return False
    email = sub.email
    await session.execute(
        delete(SubscriberEvent).where(SubscriberEvent.subscriber_id == subscriber_id)
    )
    await session.execute(
        update(Delivery)
        .where(Delivery.subscriber_id == subscriber_id)
        .values(subscriber_id=None, last_error=None)
    )
    await _scrub_blast_reasons(session, email)
    # Bounce reports often quote the address in their diagnostic (docs/bounces.md).
    await session.execute(
        update(StoredBounce)
        .where(StoredBounce.subscriber_id == subscriber_id)
        .values(subscriber_id=None, diagnostic=None)
    )
    await session.execute(
        update(StoredBounce)
        .where(func.lower(StoredBounce.diagnostic).contains(email.lower(), autoescape=True))
        .values(diagnostic=None)
    )
    await session.execute(delete(Subscriber).where(Subscriber.id == subscriber_id))
    digest = email_hash(settings, email)
    exists = await session.scalar(select(Suppression.id).where(Suppression.email_hash == digest))
    if exists is None:
        session.add(Suppression(email_hash=digest, reason="erased"))
    await session.commit()
    return True
