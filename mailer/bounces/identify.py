"""Who a report is about: only signed evidence says, never an address alone.

Anyone can mail the bounce address, so a DSN naming ``alice@example.com`` in
``Final-Recipient`` proves nothing: a forged one must not be able to unsubscribe
a stranger. What does prove it, in order:

1. the VERP tag of the envelope recipient, ``bounces+TAG@MAILER_VERP_DOMAIN``:
   subscriber and blast under an 80-bit HMAC (``Tokens.bounce_tag``). A tag that
   is present but does not verify makes the whole report unmatched, whatever
   else it carries: a tampered address is a forgery, not a typo;
2. the signed unsubscribe token in the original ``List-Unsubscribe`` header;
3. the original ``Message-ID`` (``render.make_message_id``): its HMAC binds blast
   and subscriber. It does not name the subscriber, so addresses found in the
   report are used as *candidates* only: each is looked up and the HMAC decides.

The blast comes from the tag, else from a Message-ID that verifies for the
subscriber found. Provider webhooks (verified by the provider's signature) call
:func:`from_headers` with what their payload carries (docs/bounces.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mailer.bounces.parse import Report
from mailer.config import Settings
from mailer.models import Subscriber
from mailer.render import read_message_id
from mailer.tokens import TokenError, Tokens

MAX_CANDIDATES = 5  # addresses looked up to check a Message-ID against
_UNSUBSCRIBE_TOKEN = re.compile(r"/unsubscribe/([A-Za-z0-9_\-.]{1,200})(?=[>?#\s,]|$)")
_ADDRESS = re.compile(r"[^\s<>,;:\"()]{1,64}@[A-Za-z0-9.-]{1,253}")


@dataclass(frozen=True)
class Identity:
    subscriber_id: int | None = None
    blast_id: int | None = None
    evidence: str | None = None  # verp, list-unsubscribe, message-id (what proved who)
    problem: str | None = None  # why nobody was identified, for the stored note

    @property
    def matched(self) -> bool:
        return self.subscriber_id is not None


def verp_tag(settings: Settings, envelope_to: str | None) -> str | None:
    """The TAG of ``bounces+TAG@MAILER_VERP_DOMAIN``; None for any other address."""
    if not envelope_to or not settings.verp_domain:
        return None
    local, _, domain = envelope_to.strip().strip("<>").rpartition("@")
    if domain.lower().rstrip(".") != settings.verp_domain:
        return None
    prefix, plus, tag = local.partition("+")
    if not plus or prefix.lower() != "bounces" or not tag:
        return None
    return tag


async def identify(
    session: AsyncSession,
    settings: Settings,
    tokens: Tokens,
    report: Report,
    envelope_to: str | None,
) -> Identity:
    """The subscriber and blast a parsed report is about, from signed evidence only."""
    envelope = envelope_to or report.delivered_to
    tag = verp_tag(settings, envelope)
    original = report.original
    message_id = original.message_id if original else None
    if tag is not None:
        try:
            claim = tokens.read_bounce(tag)
        except TokenError:
            return Identity(problem="the VERP tag does not verify (tampered or foreign)")
        blast = claim.blast_id
        if blast is None and message_id:
            blast = read_message_id(settings, message_id, claim.subscriber_id)
        return await _existing(session, claim.subscriber_id, blast, "verp")
    addresses = [
        a
        for r in report.recipients[:MAX_CANDIDATES]
        for a in (r.final_recipient, r.original_recipient)
        if a
    ]
    if original is None:
        return Identity(problem="no VERP tag and no original headers")
    return await from_headers(
        session,
        settings,
        tokens,
        message_id=message_id,
        list_unsubscribe=original.list_unsubscribe,
        addresses=[*_ADDRESS.findall(original.to or ""), *addresses],
    )


async def from_headers(
    session: AsyncSession,
    settings: Settings,
    tokens: Tokens,
    *,
    message_id: str | None,
    list_unsubscribe: str | None,
    addresses: list[str] | None = None,
) -> Identity:
    """Identify from the original message's headers: the signed unsubscribe token, else the
    HMAC Message-ID checked against the subscribers at ``addresses`` (candidates only)."""
    if list_unsubscribe:
        for token in _UNSUBSCRIBE_TOKEN.findall(list_unsubscribe)[:3]:
            try:
                subscriber_id = tokens.read_unsubscribe(token)
            except TokenError:
                continue
            blast = read_message_id(settings, message_id, subscriber_id) if message_id else None
            return await _existing(session, subscriber_id, blast, "list-unsubscribe")
    if message_id:
        wanted = sorted({a.strip().lower() for a in addresses or [] if "@" in a})[:MAX_CANDIDATES]
        rows = await session.execute(select(Subscriber.id).where(Subscriber.email.in_(wanted)))
        for (subscriber_id,) in rows:
            blast = read_message_id(settings, message_id, subscriber_id)
            if blast is not None:
                return Identity(subscriber_id, blast, "message-id")
    return Identity(problem="no signed evidence (VERP tag, unsubscribe token or Message-ID)")


async def _existing(
    session: AsyncSession, subscriber_id: int, blast_id: int | None, evidence: str
) -> Identity:
    if await session.get(Subscriber, subscriber_id) is None:
        return Identity(None, blast_id, evidence, problem="the subscriber no longer exists")
    return Identity(subscriber_id, blast_id, evidence)
