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

from sqlalchemy import func, insert, literal, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from mailer import blast_state
from mailer.blast_state import finish_if_complete
from mailer.db import utcnow
from mailer.errors import Conflict, Invalid, NotFound
from mailer.models import (
    Blast,
    BlastStatus,
    Delivery,
    DeliveryStatus,
    Statement,
    Subscriber,
    SubscriberStatus,
)
from mailer.queue import Queue
from mailer.runtime import Runtime

log = logging.getLogger("mailer.blasts")

ACTIVE = (BlastStatus.scheduled, BlastStatus.queued, BlastStatus.sending, BlastStatus.paused)
ENQUEUE_CONCURRENCY = 32


ACTIONS = ("pause", "resume", "cancel")


class UnknownAction(NotFound):
    """An editor asked for an action a blast does not have."""


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
        raise Invalid("send_at", "must include a timezone, e.g. 2026-01-31T09:00:00Z")
    async with runtime.sessions() as session:
        if await session.get(Statement, statement_id) is None:
            raise Invalid("statement_id", f"no statement with id {statement_id}")
        running = await session.scalar(
            select(Blast.id).where(Blast.statement_id == statement_id, Blast.status.in_(ACTIVE))
        )
        if running is not None:
            raise Conflict(f"statement {statement_id} already has an active blast (id {running})")
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
        blast_state.start_sending(blast, total)
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


async def pause(runtime: Runtime, blast_id: int) -> Blast:
    return await blast_state.transition(
        runtime, blast_id, (BlastStatus.sending, BlastStatus.queued), BlastStatus.paused,
        reason="paused by an editor",
    )  # fmt: skip


async def resume(runtime: Runtime, queue: Queue, blast_id: int) -> Blast:
    async with runtime.sessions() as session:
        started = await session.scalar(select(Blast.started_at).where(Blast.id == blast_id))
    target = BlastStatus.sending if started is not None else BlastStatus.queued
    blast = await blast_state.transition(
        runtime, blast_id, (BlastStatus.paused,), target, reason=None
    )
    if target == BlastStatus.queued:
        await queue.start_blast(runtime.keys.start_job_id(blast_id), blast_id, None)
    else:
        await fan_out(runtime, queue, blast_id)
    return blast


async def cancel(runtime: Runtime, blast_id: int) -> Blast:
    return await blast_state.transition(
        runtime,
        blast_id,
        (BlastStatus.scheduled, BlastStatus.queued, BlastStatus.sending, BlastStatus.paused),
        BlastStatus.cancelled,
        finished_at=utcnow(),
    )


async def apply_action(runtime: Runtime, queue: Queue, blast_id: int, action: str) -> Blast:
    """An editor's action by name, for the API and the admin UI alike."""
    if action == "pause":
        return await pause(runtime, blast_id)
    if action == "resume":
        return await resume(runtime, queue, blast_id)
    if action == "cancel":
        return await cancel(runtime, blast_id)
    raise UnknownAction(f"unknown action {action!r}; use pause, resume or cancel")


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
