"""What an event does: store it once, then act on the subscriber and the blast.

- hard: the subscriber becomes ``bounced`` at once, with the reason. Blasts under
  way stop sending to them because delivery re-checks each subscriber right
  before sending.
- soft: stored and counted; the subscriber becomes ``bounced`` when soft bounces
  from ``MAILER_SOFT_BOUNCE_LIMIT`` different messages fall within the last
  ``MAILER_SOFT_BOUNCE_WINDOW_DAYS``. Older ones decay out of the window; a
  later successful delivery erases nothing. Several "delayed" notices about one
  message count once (they are counted per blast).
- complaint: unsubscribed with reason ``complaint``, and the address goes on the
  suppression list (the keyed hash of ``privacy.py``) so no import re-adds it.
- policy, ignored, unmatched: stored, nothing else.

A blast still sending pauses itself when the subscribers with a hard bounce, or
with a complaint, pass their rate (``MAILER_BOUNCE_PAUSE_RATE``,
``MAILER_COMPLAINT_PAUSE_RATE``) of its attempted messages, once at least
``MAILER_BOUNCE_PAUSE_MIN_SENT`` were attempted. Each threshold pauses a blast at
most once: an editor who resumes has seen the reason, and is not overruled by
the next bounce. Everything happens in the caller's transaction, so the event and
its effects commit together (docs/bounces.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from mailer.blast_state import pause_in_session
from mailer.bounces import stats
from mailer.bounces.events import BounceEvent, store
from mailer.config import Settings
from mailer.models import (
    Blast,
    BlastStatus,
    BounceKind,
    StoredBounce,
    Subscriber,
    SubscriberEvent,
    SubscriberStatus,
    Suppression,
)
from mailer.privacy import email_hash, suppressed_addresses

log = logging.getLogger("mailer.bounces")

STILL_SUBSCRIBED = (SubscriberStatus.pending, SubscriberStatus.confirmed)
ACTS = (BounceKind.hard, BounceKind.soft, BounceKind.complaint)  # the others are only stored
NOTHING = "nothing changed"


@dataclass(frozen=True)
class Applied:
    event_id: int | None  # None: a duplicate, nothing was done
    action: str  # what was done, for people: the ingest line, the stored note
    paused: str | None = None  # the reason, when this event paused its blast

    @property
    def duplicate(self) -> bool:
        return self.event_id is None


async def apply(
    session: AsyncSession, settings: Settings, event: BounceEvent, now: datetime
) -> Applied:
    """Store ``event`` and act on it, in the caller's transaction (the caller commits)."""
    if event.kind not in ACTS:
        # Nothing to do and no blast to pause: the note is known before the insert, so
        # the event is stored with it (one statement, e.g. a policy refusal in record.py).
        event_id = await store(session, event.with_note(NOTHING), now)
        if event_id is None:
            return Applied(None, "already ingested: nothing changed")
        return Applied(event_id, NOTHING)
    event_id = await store(session, event, now)
    if event_id is None:
        return Applied(None, "already ingested: nothing changed")
    sub = event.subscriber_id
    if sub is None:
        action = NOTHING
    elif event.kind is BounceKind.hard:
        action = await _bounce(session, sub, now, f"hard bounce {_cause(event)}")
    elif event.kind is BounceKind.soft:
        action = await _soft(session, settings, event, sub, now)
    else:
        action = await _complaint(session, settings, event, sub, now)
    paused = None
    if event.blast_id is not None and event.kind in (BounceKind.hard, BounceKind.complaint):
        paused = await _maybe_pause(session, settings, event.blast_id, event.kind, event_id)
    note = "; ".join(x for x in (event.note, action, paused and "paused the blast") if x)
    await session.execute(
        update(StoredBounce).where(StoredBounce.id == event_id).values(note=note[:300])
    )
    return Applied(event_id, action, paused)


def _cause(event: BounceEvent) -> str:
    code = " ".join(str(x) for x in (event.code, event.status) if x) or "no code"
    blast = f" in blast {event.blast_id}" if event.blast_id is not None else ""
    words = f": {event.diagnostic}" if event.diagnostic else ""
    return f"({code}, via {event.source}{blast}){words}"[:450]


async def _bounce(session: AsyncSession, subscriber_id: int, now: datetime, detail: str) -> str:
    result = await session.execute(
        update(Subscriber)
        .where(Subscriber.id == subscriber_id, Subscriber.status.in_(STILL_SUBSCRIBED))
        .values(status=SubscriberStatus.bounced, bounced_at=now, updated_at=now)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        status = await session.scalar(
            select(Subscriber.status).where(Subscriber.id == subscriber_id)
        )
        return f"subscriber {subscriber_id} was already {status}"
    session.add(SubscriberEvent(subscriber_id=subscriber_id, kind="bounced", at=now, detail=detail))
    return f"subscriber {subscriber_id} bounced"


async def _soft(
    session: AsyncSession, settings: Settings, event: BounceEvent, subscriber_id: int, now: datetime
) -> str:
    days = settings.soft_bounce_window_days
    rows = await session.execute(
        select(StoredBounce.id, StoredBounce.blast_id).where(
            StoredBounce.subscriber_id == subscriber_id,
            StoredBounce.kind == BounceKind.soft.value,
            StoredBounce.received_at > now - timedelta(days=days),
            StoredBounce.received_at <= now,
        )
    )
    messages = {f"b{blast}" if blast is not None else f"e{row_id}" for row_id, blast in rows}
    count, limit = len(messages), settings.soft_bounce_limit
    if count < limit:
        return f"soft bounce {count} of {limit} within {days} days for subscriber {subscriber_id}"
    detail = f"{count} soft bounces within {days} days, the last {_cause(event)}"
    return await _bounce(session, subscriber_id, now, detail) + f" ({count} soft in {days} days)"


async def _complaint(
    session: AsyncSession, settings: Settings, event: BounceEvent, subscriber_id: int, now: datetime
) -> str:
    email = await session.scalar(select(Subscriber.email).where(Subscriber.id == subscriber_id))
    result = await session.execute(
        update(Subscriber)
        .where(Subscriber.id == subscriber_id, Subscriber.status != SubscriberStatus.unsubscribed)
        .values(status=SubscriberStatus.unsubscribed, unsubscribed_at=now, updated_at=now)
    )
    if result.rowcount:  # type: ignore[attr-defined]
        session.add(
            SubscriberEvent(
                subscriber_id=subscriber_id,
                kind="unsubscribed",
                at=now,
                detail=f"complaint (via {event.source}, evidence {event.evidence})",
            )
        )
    if email is not None and not await suppressed_addresses(session, settings, [email]):
        session.add(Suppression(email_hash=email_hash(settings, email), reason="complaint"))
    done = "unsubscribed" if result.rowcount else "was already unsubscribed"  # type: ignore[attr-defined]
    return f"subscriber {subscriber_id} {done}, address suppressed (complaint)"


async def _maybe_pause(
    session: AsyncSession, settings: Settings, blast_id: int, kind: BounceKind, event_id: int
) -> str | None:
    status = await session.scalar(select(Blast.status).where(Blast.id == blast_id))
    if status != BlastStatus.sending:
        return None
    already = await session.scalar(
        select(StoredBounce.id).where(
            StoredBounce.blast_id == blast_id,
            StoredBounce.kind == kind.value,
            StoredBounce.paused_blast.is_(True),
        )
    )
    if already is not None:
        return None
    hard = kind is BounceKind.hard
    rate = settings.bounce_pause_rate if hard else settings.complaint_pause_rate
    minimum = settings.bounce_pause_min_sent
    n = await stats.subscribers_with(session, blast_id, kind)
    if n <= rate * minimum:  # cannot be over the rate with at least `minimum` attempted
        return None
    # Over the rate means attempted < n / rate: no need to count further than that.
    attempted = await stats.attempted(session, blast_id, at_most=math.ceil(n / rate) + 1)
    if attempted < minimum or n <= rate * attempted:
        return None
    what, setting, advice = (
        ("hard-bounce", "MAILER_BOUNCE_PAUSE_RATE", "check where the addresses came from")
        if hard
        else ("complaint", "MAILER_COMPLAINT_PAUSE_RATE", "recipients report this mail as spam")
    )
    reason = (
        f"paused automatically: {what} rate {n / attempted:.1%} ({n} of {attempted} sent) "
        f"is over {setting} {rate:.1%}; {advice} before resuming"
    )
    if not await pause_in_session(session, blast_id, reason):
        return None
    await session.execute(
        update(StoredBounce).where(StoredBounce.id == event_id).values(paused_blast=True)
    )
    log.error(
        "blast %s paused: %s",
        blast_id,
        reason,
        extra={"blast_id": blast_id, "status": BlastStatus.paused.value},
    )
    return reason
