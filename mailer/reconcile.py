"""The reconciler: re-derive lost work from SQL, so a lost Redis costs only time.

SQL is the truth (docs/design.md, invariant 1); Redis only holds work that can be
derived again from the rows. An arq cron job (unique across workers) runs this
every ``MAILER_RECONCILE_INTERVAL_S``: it starts due blasts, frees the rows whose
lease ran out (a worker died holding them), fans out blasts whose batches
stopped moving, and queues the confirmation mails that are due but have no job.
"""

from __future__ import annotations

import logging

from sqlalchemy import or_, select, update

from mailer import confirmations
from mailer.blast_state import finish_if_complete
from mailer.blasts import fan_out
from mailer.db import utcnow
from mailer.models import Blast, BlastStatus, Delivery, DeliveryStatus
from mailer.queue import Queue
from mailer.runtime import Runtime

# The logger of the module this came from (mailer/blasts.py): JSON logs carry the name.
log = logging.getLogger("mailer.blasts")


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
    await confirmations.requeue_due(runtime, queue)


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
