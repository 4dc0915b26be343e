"""Blasts: snapshot the audience, fan out batches, pause/resume/cancel, report progress.

The snapshot is one ``INSERT … SELECT`` of per-recipient delivery rows, unique
per blast and subscriber, so a blast goes to exactly the confirmed subscribers
at its start and nobody can be counted twice. Batches are jobs over ranges of
delivery ids; the rows, not the jobs, say what is left to do, so a lost Redis
costs nothing but time: the reconciler fans out whatever is still pending.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, literal, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from mailer.db import utcnow
from mailer.models import (
    Blast,
    BlastStatus,
    Delivery,
    DeliveryStatus,
    Statement,
    Subscriber,
    SubscriberStatus,
)
from mailer.record import finish_if_complete
from mailer.runtime import Runtime
from mailer.worker import Queue

log = logging.getLogger("mailer.blasts")

ACTIVE = (BlastStatus.scheduled, BlastStatus.queued, BlastStatus.sending, BlastStatus.paused)
ENQUEUE_CONCURRENCY = 32


class BlastError(Exception):
    """A request the blast's state or input forbids; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Progress:
    id: int
    statement_id: int
    status: str
    total: int
    sent: int
    failed: int
    skipped: int
    cancelled: int
    pending: int
    reason: str | None
    created_at: datetime
    send_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.__dict__)
        for key in ("created_at", "send_at", "started_at", "finished_at"):
            value = out[key]
            out[key] = value.isoformat() if value else None
        return out


# Creating and starting --------------------------------------------------------------


async def create(
    runtime: Runtime,
    queue: Queue,
    statement_id: int,
    send_at: datetime | None,
    editor_id: int | None,
) -> Blast:
    now = utcnow()
    if send_at is not None and send_at.tzinfo is None:
        raise BlastError(422, "send_at: must include a timezone, e.g. 2026-01-31T09:00:00Z")
    async with runtime.sessions() as session:
        if await session.get(Statement, statement_id) is None:
            raise BlastError(422, f"statement_id: no statement with id {statement_id}")
        running = await session.scalar(
            select(Blast.id).where(Blast.statement_id == statement_id, Blast.status.in_(ACTIVE))
        )
        if running is not None:
            raise BlastError(
                409, f"statement {statement_id} already has an active blast (id {running})"
            )
        scheduled = send_at is not None and send_at > now
        blast = Blast(
            statement_id=statement_id,
            editor_id=editor_id,
            status=BlastStatus.scheduled if scheduled else BlastStatus.queued,
            send_at=send_at,
        )
        session.add(blast)
        await session.commit()
    log.info(
        "blast %s created (%s)",
        blast.id,
        blast.status,
        extra={"blast_id": blast.id, "status": str(blast.status)},
    )
    await queue.start_blast(runtime.keys.start_job_id(blast.id), blast.id, send_at)
    return blast


async def start_due(runtime: Runtime, queue: Queue, blast_id: int) -> None:
    """Snapshot the audience and fan out, once; a no-op when the blast is not due."""
    async with runtime.sessions() as session:
        blast = await session.get(Blast, blast_id, with_for_update=True)
        if blast is None:
            return
        if blast.status == BlastStatus.scheduled:
            if blast.send_at is not None and blast.send_at > utcnow():
                await session.rollback()
                await queue.start_blast(
                    runtime.keys.start_job_id(blast_id), blast_id, blast.send_at
                )
                return
        elif blast.status != BlastStatus.queued:
            await session.rollback()
            return
        total = await snapshot(session, blast_id)
        blast.status = BlastStatus.sending
        blast.total = total
        blast.started_at = utcnow()
        await session.commit()
    log.info(
        "blast %s sending to %s subscribers",
        blast_id,
        total,
        extra={"blast_id": blast_id, "status": BlastStatus.sending.value, "total": total},
    )
    await fan_out(runtime, queue, blast_id)
    await finish_if_complete(runtime, blast_id)


async def snapshot(session: AsyncSession, blast_id: int) -> int:
    """One INSERT … SELECT of the confirmed audience; the unique key makes it idempotent."""
    audience = select(
        literal(blast_id), Subscriber.id, literal(DeliveryStatus.pending.value), literal(0)
    ).where(Subscriber.status == SubscriberStatus.confirmed)
    stmt = insert(Delivery).from_select(
        ["blast_id", "subscriber_id", "status", "attempts"], audience
    )
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(text("SET LOCAL synchronous_commit = off"))
    await session.execute(stmt)
    count = await session.scalar(select(func.count()).where(Delivery.blast_id == blast_id))
    return int(count or 0)


async def batch_ranges(
    session: AsyncSession, blast_id: int, batch_size: int
) -> list[tuple[int, int]]:
    """Split the due pending rows into ranges of about ``batch_size`` ids each."""
    now = utcnow()
    due = (
        select(Delivery.id, func.row_number().over(order_by=Delivery.id).label("rn"))
        .where(
            Delivery.blast_id == blast_id,
            Delivery.status == DeliveryStatus.pending,
            or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
        )
        .subquery()
    )
    starts = list(
        await session.scalars(
            select(due.c.id).where((due.c.rn - 1) % batch_size == 0).order_by(due.c.id)
        )
    )
    if not starts:
        return []
    last = await session.scalar(
        select(func.max(Delivery.id)).where(
            Delivery.blast_id == blast_id, Delivery.status == DeliveryStatus.pending
        )
    )
    ends = [s - 1 for s in starts[1:]] + [int(last or starts[-1])]
    return list(zip(starts, ends, strict=True))


async def fan_out(runtime: Runtime, queue: Queue, blast_id: int, generation: str = "") -> int:
    """Enqueue one job per range of due rows. Duplicate jobs are harmless: rows are claimed.

    Job ids are derived from the range, so fanning out twice while jobs wait in the queue
    adds nothing; a new ``generation`` gets past jobs that are stuck (see ``reconcile``).
    """
    async with runtime.sessions() as session:
        ranges = await batch_ranges(session, blast_id, runtime.settings.batch_size)
    gate = asyncio.Semaphore(ENQUEUE_CONCURRENCY)

    async def _one(first: int, last: int) -> bool:
        async with gate:
            job_id = runtime.keys.batch_job_id(blast_id, first, generation)
            return await queue.batch(job_id, blast_id, first, last)

    results = await asyncio.gather(*(_one(a, b) for a, b in ranges))
    return sum(results)


# Editor actions -------------------------------------------------------------------


async def _transition(
    runtime: Runtime, blast_id: int, allowed: tuple[str, ...], to: str, **values: Any
) -> Blast:
    async with runtime.sessions() as session:
        blast = await session.get(Blast, blast_id, with_for_update=True)
        if blast is None:
            raise BlastError(404, f"no blast with id {blast_id}")
        if blast.status not in allowed:
            raise BlastError(409, f"blast {blast_id} is {blast.status}; cannot make it {to}")
        blast.status = to
        for key, value in values.items():
            setattr(blast, key, value)
        if to == BlastStatus.cancelled:
            await session.execute(
                update(Delivery)
                .where(Delivery.blast_id == blast_id, Delivery.status == DeliveryStatus.pending)
                .values(status=DeliveryStatus.cancelled)
            )
        await session.commit()
    log.info("blast %s is now %s", blast_id, to, extra={"blast_id": blast_id, "status": str(to)})
    return blast


async def pause(runtime: Runtime, blast_id: int) -> Blast:
    return await _transition(
        runtime, blast_id, (BlastStatus.sending, BlastStatus.queued), BlastStatus.paused,
        reason="paused by an editor",
    )  # fmt: skip


async def resume(runtime: Runtime, queue: Queue, blast_id: int) -> Blast:
    async with runtime.sessions() as session:
        started = await session.scalar(select(Blast.started_at).where(Blast.id == blast_id))
    target = BlastStatus.sending if started is not None else BlastStatus.queued
    blast = await _transition(runtime, blast_id, (BlastStatus.paused,), target, reason=None)
    if target == BlastStatus.queued:
        await queue.start_blast(runtime.keys.start_job_id(blast_id), blast_id, None)
    else:
        await fan_out(runtime, queue, blast_id)
    return blast


async def cancel(runtime: Runtime, blast_id: int) -> Blast:
    return await _transition(
        runtime,
        blast_id,
        (BlastStatus.scheduled, BlastStatus.queued, BlastStatus.sending, BlastStatus.paused),
        BlastStatus.cancelled,
        finished_at=utcnow(),
    )


# Progress --------------------------------------------------------------------------


async def progress(session: AsyncSession, blast_id: int) -> Progress | None:
    blast = await session.get(Blast, blast_id)
    if blast is None:
        return None
    rows = await session.execute(
        select(Delivery.status, func.count())
        .where(Delivery.blast_id == blast_id)
        .group_by(Delivery.status)
    )
    counts: dict[str, int] = {status: int(n) for status, n in rows}
    return Progress(
        id=blast.id,
        statement_id=blast.statement_id,
        status=blast.status,
        total=blast.total,
        sent=counts.get(DeliveryStatus.sent, 0),
        failed=counts.get(DeliveryStatus.failed, 0),
        skipped=counts.get(DeliveryStatus.skipped, 0),
        cancelled=counts.get(DeliveryStatus.cancelled, 0),
        pending=counts.get(DeliveryStatus.pending, 0) + counts.get(DeliveryStatus.sending, 0),
        reason=blast.reason,
        created_at=blast.created_at,
        send_at=blast.send_at,
        started_at=blast.started_at,
        finished_at=blast.finished_at,
    )


async def list_blasts(session: AsyncSession, limit: int = 50, offset: int = 0) -> list[Progress]:
    ids = await session.scalars(
        select(Blast.id).order_by(Blast.id.desc()).limit(limit).offset(offset)
    )
    out = []
    for blast_id in list(ids):
        p = await progress(session, blast_id)
        if p is not None:
            out.append(p)
    return out


# The reconciler --------------------------------------------------------------------


async def reconcile(runtime: Runtime, queue: Queue) -> None:
    """Re-derive lost work from SQL: start due blasts, free expired leases, fan out idle blasts.

    Runs as a unique arq cron job. A blast whose batches made progress within the last few
    reconcile intervals is left alone; duplicate work would be harmless but wasteful.
    """
    now = utcnow()
    async with runtime.sessions() as session:
        due = list(
            await session.scalars(
                select(Blast.id).where(
                    or_(
                        Blast.status == BlastStatus.queued,
                        (Blast.status == BlastStatus.scheduled) & (Blast.send_at <= now),
                    )
                )
            )
        )
        sending = list(
            await session.scalars(select(Blast.id).where(Blast.status == BlastStatus.sending))
        )
        # Rows a dead worker held when its blast was cancelled: cancelled too, once free.
        await session.execute(
            update(Delivery)
            .where(
                Delivery.blast_id.in_(
                    select(Blast.id).where(Blast.status == BlastStatus.cancelled).scalar_subquery()
                ),
                or_(
                    Delivery.status == DeliveryStatus.pending,
                    (Delivery.status == DeliveryStatus.sending) & (Delivery.lease_until < now),
                ),
            )
            .values(status=DeliveryStatus.cancelled, lease_until=None)
        )
        await session.commit()
        if sending:
            await session.execute(
                update(Delivery)
                .where(
                    Delivery.blast_id.in_(sending),
                    Delivery.status == DeliveryStatus.sending,
                    Delivery.lease_until < now,
                )
                .values(status=DeliveryStatus.pending, lease_until=None)
            )
            await session.commit()
    for blast_id in due:
        await queue.start_blast(runtime.keys.start_job_id(blast_id), blast_id, None)
    for blast_id in sending:
        if await finish_if_complete(runtime, blast_id):
            continue
        if await runtime.redis.exists(runtime.keys.blast_active(blast_id)):
            continue
        enqueued = await fan_out(runtime, queue, blast_id)
        if not enqueued:
            enqueued = await _unstick(runtime, queue, blast_id)
        if enqueued:
            log.info("reconciler: blast %s had idle work, enqueued %s batches", blast_id, enqueued)


async def _unstick(runtime: Runtime, queue: Queue, blast_id: int) -> int:
    """Work is left but every range already has a job id taken, and nothing moves.

    That happens when a worker died holding jobs: arq keeps their in-progress keys until
    the job timeout + 10 s runs out. Once the blast has been idle longer than a lease,
    fan out again under a new generation of job ids instead of waiting.
    """
    keys = runtime.keys
    now = utcnow().timestamp()
    since = await runtime.redis.get(keys.blast_idle(blast_id))
    if since is None:
        await runtime.redis.set(keys.blast_idle(blast_id), now, ex=86400)
        return 0
    stale_after = max(
        2 * runtime.settings.delivery_lease_s, 3 * runtime.settings.reconcile_interval_s
    )
    if now - float(since) < stale_after:
        return 0
    await runtime.redis.set(keys.blast_idle(blast_id), now, ex=86400)
    return await fan_out(runtime, queue, blast_id, generation=f"g{int(now)}")
