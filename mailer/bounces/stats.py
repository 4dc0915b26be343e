"""Bounce and complaint figures: per blast (rates for editors and the auto-pause), in total
(for ``/metrics``), and the bounce log editors can filter.

Rates count *distinct subscribers* per kind, not reports: one subscriber mailing many
forged DSNs to their own VERP address must not be able to push a blast over its
pause threshold. The denominator is the blast's messages handed to the relay or
refused by it (deliveries ``sent`` or ``failed``): refusals during the transaction
are bounces too, so a blast refused everywhere still has a rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import distinct, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from mailer.models import BounceKind, Delivery, DeliveryStatus, StoredBounce, Subscriber

ATTEMPTED = (DeliveryStatus.sent, DeliveryStatus.failed)


@dataclass(frozen=True)
class BlastBounces:
    blast_id: int
    attempted: int  # deliveries sent or refused
    hard: int
    soft: int
    complaints: int
    policy: int

    def rate(self, n: int) -> float:
        return n / self.attempted if self.attempted else 0.0

    @property
    def hard_rate(self) -> float:
        return self.rate(self.hard)

    @property
    def complaint_rate(self) -> float:
        return self.rate(self.complaints)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"hard_rate": self.hard_rate, "complaint_rate": self.complaint_rate}


async def attempted(session: AsyncSession, blast_id: int, at_most: int | None = None) -> int:
    """Deliveries of the blast sent or refused; counting stops at ``at_most`` (a bounded
    count keeps the auto-pause check cheap on a blast of a million)."""
    rows = select(Delivery.id).where(Delivery.blast_id == blast_id, Delivery.status.in_(ATTEMPTED))
    if at_most is not None:
        rows = rows.limit(at_most)
    return int(await session.scalar(select(func.count()).select_from(rows.subquery())) or 0)


async def subscribers_with(session: AsyncSession, blast_id: int, kind: BounceKind) -> int:
    return int(
        await session.scalar(
            select(func.count(distinct(StoredBounce.subscriber_id))).where(
                StoredBounce.blast_id == blast_id, StoredBounce.kind == kind.value
            )
        )
        or 0
    )


async def for_blast(session: AsyncSession, blast_id: int) -> BlastBounces:
    """Bounces (hard, soft), complaints and policy refusals of one blast, with rates."""
    rows = await session.execute(
        select(StoredBounce.kind, func.count(distinct(StoredBounce.subscriber_id)))
        .where(StoredBounce.blast_id == blast_id)
        .group_by(StoredBounce.kind)
    )
    by_kind = {str(kind): int(n) for kind, n in rows}
    return BlastBounces(
        blast_id=blast_id,
        attempted=await attempted(session, blast_id),
        hard=by_kind.get(BounceKind.hard, 0),
        soft=by_kind.get(BounceKind.soft, 0),
        complaints=by_kind.get(BounceKind.complaint, 0),
        policy=by_kind.get(BounceKind.policy, 0),
    )


async def totals(session: AsyncSession) -> dict[str, int]:
    """Stored events by kind, every kind present (0 when none), for ``/metrics``."""
    rows = await session.execute(
        select(StoredBounce.kind, func.count()).group_by(StoredBounce.kind)
    )
    out = {kind.value: 0 for kind in BounceKind}
    out.update({str(kind): int(n) for kind, n in rows})
    return out


async def log(
    session: AsyncSession,
    *,
    blast_id: int | None = None,
    kind: str | None = None,
    subscriber_id: int | None = None,
    since: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[StoredBounce]:
    """The bounce log, newest first, filtered by any of blast, kind, subscriber, time."""
    query = select(StoredBounce).order_by(StoredBounce.id.desc())
    if blast_id is not None:
        query = query.where(StoredBounce.blast_id == blast_id)
    if kind is not None:
        query = query.where(StoredBounce.kind == kind)
    if subscriber_id is not None:
        query = query.where(StoredBounce.subscriber_id == subscriber_id)
    if since is not None:
        query = query.where(StoredBounce.received_at >= since)
    rows = await session.scalars(query.limit(max(1, min(limit, 1000))).offset(max(0, offset)))
    return list(rows)


async def emails_of(session: AsyncSession, events: list[StoredBounce]) -> dict[int, str | None]:
    """The address of each subscriber the events name (None once erased), in one query."""
    ids = {e.subscriber_id for e in events if e.subscriber_id is not None}
    if not ids:
        return {}
    rows = await session.execute(
        select(Subscriber.id, Subscriber.email).where(Subscriber.id.in_(ids))
    )
    return {i: e for i, e in rows}
