"""The delivery rows of a batch: claimed under a lease, kept, handed back or deferred.

A row is ``pending`` until a batch claims it (``sending``, with ``lease_until``);
the recorder then writes its outcome. A worker that dies holding rows loses them
only until the lease runs out: the reconciler makes them ``pending`` again. This
is what bounds the repeats after a crash (docs/design.md, invariant 2): the rows,
not the jobs, say what is left to do.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar, cast

from sqlalchemy import Integer, Update, bindparam, func, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute

from mailer import blast_state
from mailer.db import single_reads, utcnow
from mailer.models import Delivery, DeliveryStatus
from mailer.runtime import Runtime

T = TypeVar("T")

# At most this many seconds of a rate-limited domain per chunk. A chunk ends when its
# slowest domain is through, so this is also how long other domains' mail may wait on it.
DOMAIN_CHUNK_S = 2.0


@dataclass
class Claimed:
    delivery_id: int
    subscriber_id: int
    attempts: int
    first_attempt_at: datetime | None


def split_by_domain(
    items: list[Claimed], addresses: dict[int, str], rates: dict[str, float]
) -> tuple[list[Claimed], dict[str, list[Claimed]]]:
    """Rows for rate-limited domains (per domain), apart from the rest."""
    general: list[Claimed] = []
    by_domain: dict[str, list[Claimed]] = {}
    for item in items:
        domain = addresses[item.subscriber_id].rpartition("@")[2].lower()
        if rates.get(domain, 0) > 0:
            by_domain.setdefault(domain, []).append(item)
        else:
            general.append(item)
    return general, by_domain


class Claims:
    """Claims, leases and deferrals of delivery rows, for one worker process."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self._reads = single_reads(runtime.engine)

    async def next_due_id(self, blast_id: int, first_id: int, last_id: int) -> int | None:
        """The first pending row of the range (where a continuing job starts)."""
        return await self._least_pending(Delivery.id, blast_id, first_id, last_id)

    async def next_attempt_at(self, blast_id: int, first_id: int, last_id: int) -> datetime | None:
        """When the first row of the range that was handed back for later is due again."""
        return await self._least_pending(Delivery.next_attempt_at, blast_id, first_id, last_id)

    async def _least_pending(
        self, column: InstrumentedAttribute[T], blast_id: int, first_id: int, last_id: int
    ) -> T | None:
        """The least ``column`` of the range's pending rows (every batch job ends with one:
        a Core statement built once per column, on a plain connection)."""
        params = {"l_blast": blast_id, "l_first": first_id, "l_last": last_id}
        async with self._reads.connect() as conn:  # one statement: no BEGIN (db.single_reads)
            return cast(T | None, await conn.scalar(_LEAST_PENDING[column.key], params))

    async def claim(self, blast_id: int, first_id: int, last_id: int, limit: int) -> list[Claimed]:
        """Take up to ``limit`` due rows of the range, in id order, under a fresh lease.

        Rows whose subscriber was erased after the snapshot are skipped on the spot.
        A Core statement built once, on a plain connection: the ORM's bulk UPDATE built
        the statement and synchronised its session on every claim (bench/analysis.md,
        step 10).
        """
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.delivery_lease_s)
        params = {
            "c_blast": blast_id,
            "c_first": first_id,
            "c_last": last_id,
            "c_now": now,
            "c_lease": lease,
            "c_limit": limit,
        }
        postgres = self.runtime.engine.dialect.name == "postgresql"
        async with self.runtime.engine.begin() as conn:
            rows = (await conn.execute(_CLAIM[postgres], params)).all()
            claimed = [Claimed(r[0], r[1], r[2], r[3]) for r in rows if r[1] is not None]
            erased = [r[0] for r in rows if r[1] is None]  # erased after the snapshot
            if erased:
                await conn.execute(
                    update(Delivery)
                    .where(Delivery.id.in_(erased))
                    .values(status=DeliveryStatus.skipped, lease_until=None)
                )
        claimed.sort(key=lambda c: c.delivery_id)
        return claimed

    async def keep_leases(self, unsent: set[int]) -> None:
        """Keep our claim while we wait for the throttle, so nobody takes these rows over.

        Runs until cancelled; ``unsent`` shrinks as outcomes are recorded.
        """
        every = max(0.5, self.settings.delivery_lease_s / 3)
        while True:
            await asyncio.sleep(every)
            if not unsent:
                continue
            lease = utcnow() + timedelta(seconds=self.settings.delivery_lease_s)
            async with self.runtime.sessions() as session:
                await session.execute(
                    update(Delivery)
                    .where(Delivery.id.in_(list(unsent)), Delivery.status == DeliveryStatus.sending)
                    .values(lease_until=lease)
                )
                await session.commit()

    async def defer(
        self,
        items: list[Claimed],
        until: datetime,
        *,
        blast_id: int | None = None,
        waiting: str | None = None,
    ) -> None:
        """Hand claimed rows back, due again at ``until``; nothing was sent to them.

        With ``waiting``, the blast shows that note in the same transaction.
        """
        async with self.runtime.sessions() as session:
            await session.execute(
                update(Delivery)
                .where(Delivery.id.in_([c.delivery_id for c in items]))
                .values(status=DeliveryStatus.pending, lease_until=None, next_attempt_at=until)
            )
            if blast_id is not None and waiting is not None:
                await blast_state.note_waiting(session, blast_id, waiting)
            await session.commit()

    async def defer_domain_excess(self, by_domain: dict[str, list[Claimed]]) -> None:
        """Keep a chunk to about DOMAIN_CHUNK_S of each slow domain; the rest waits in SQL.

        Nothing is booked in the throttle for deferred rows, so no slot is wasted, and the
        chunk stays short enough for its lease.
        """
        now = utcnow()
        for domain, items in by_domain.items():
            rate = self.settings.domain_rates[domain]
            allowed = max(1, int(rate * DOMAIN_CHUNK_S))
            excess = items[allowed:]
            if not excess:
                continue
            del items[allowed:]
            await self.defer(excess, now + timedelta(seconds=allowed / rate))


def _claim(postgres: bool) -> Update:
    """The claim: the due rows of a range, in id order, under a lease (skipping rows that
    another worker holds locked, on PostgreSQL); built once per dialect."""
    now = bindparam("c_now", type_=Delivery.lease_until.type)
    due = (
        select(Delivery.id)
        .where(
            Delivery.blast_id == bindparam("c_blast"),
            Delivery.id.between(bindparam("c_first"), bindparam("c_last")),
            Delivery.status == DeliveryStatus.pending,
            or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
        )
        .order_by(Delivery.id)
        .limit(bindparam("c_limit", type_=Integer))
    )
    if postgres:
        due = due.with_for_update(skip_locked=True)
    return (
        update(Delivery)
        .where(Delivery.id.in_(due.scalar_subquery()))
        .where(Delivery.status == DeliveryStatus.pending)
        .values(
            status=DeliveryStatus.sending,
            lease_until=bindparam("c_lease", type_=Delivery.lease_until.type),
            first_attempt_at=func.coalesce(Delivery.first_attempt_at, now),
        )
        .returning(
            Delivery.id, Delivery.subscriber_id, Delivery.attempts, Delivery.first_attempt_at
        )
    )


_CLAIM = {postgres: _claim(postgres) for postgres in (False, True)}
# Claims._least_pending, by column name: where a continuing job starts, when a row is due.
_LEAST_PENDING = {
    column.key: select(func.min(column)).where(
        Delivery.blast_id == bindparam("l_blast"),
        Delivery.id.between(bindparam("l_first"), bindparam("l_last")),
        Delivery.status == DeliveryStatus.pending,
    )
    for column in (Delivery.id, Delivery.next_attempt_at)
}
