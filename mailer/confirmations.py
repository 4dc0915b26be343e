"""The double opt-in mail: owed in SQL, sent by a job, queued again by the reconciler.

SQL is the truth here as it is for blasts (docs/design.md, invariant 1): a sign-up or
an import records ``subscribers.confirm_due_at`` in the transaction that records the
person, then queues a job named after the row and that due time. If the job is lost
(Redis flushed, the process died before it queued it, a payload it could not read),
the reconciler queues it again (``requeue_due``); a job that is still alive keeps its
id, so it is not queued twice.

A job first claims its row in SQL (due moves a lease ahead), so two jobs for one row
never both send; once the relay accepted the mail, due becomes NULL and
``confirm_sent_at`` says when. Transient failures and policy refusals (5.7.x: our
problem, not the address's) move due on by the backoff and queue the next try, until
they have waited ``MAILER_RETRY_MAX_AGE_S``. At least once: a worker that dies after
the relay accepted a mail but before the row says so sends it again when its lease
runs out (docs/security.md, "Confirmation mails are SQL truth").

The mail goes only while the subscriber is still pending, or left earlier and signed up
again since (the row keeps its status until this mail's link is clicked), so a try that
runs after the visitor already confirmed (or left) sends nothing.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.sql.elements import ColumnElement

from mailer.backoff import retry_delay, waited
from mailer.db import utcnow
from mailer.models import Subscriber, SubscriberEvent, SubscriberStatus
from mailer.queue import Queue
from mailer.render import Renderer
from mailer.runtime import Runtime
from mailer.smtp import (
    PermanentSendError,
    PolicyError,
    SmtpConfigError,
    SmtpPool,
    TransientSendError,
)
from mailer.subscriptions import LEFT, Owed, mark_bounced

log = logging.getLogger("mailer.confirmations")

JOB_TIMEOUT_S = 60  # the arq timeout of a send_confirmation job (mailer/worker.py)
# A claim outlives the job that made it: arq cuts a job at its timeout, and runs it again
# only once its in-progress key has expired (timeout + 10 s).
LEASE = timedelta(seconds=JOB_TIMEOUT_S + 10)
# A try queued for its due time may start a little early on a worker whose clock is behind.
CLOCK_SLACK = timedelta(seconds=1)
REQUEUE_LIMIT = 5000  # due mails queued per reconciler pass, oldest first
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def awaits_confirmation(sub: Subscriber) -> bool:
    """Pending, or left and signed up again since: the two cases a confirmation mail is for."""
    if sub.status == SubscriberStatus.pending:
        return True
    return sub.status in LEFT and sub.resubscribe_requested_at is not None


def awaiting() -> ColumnElement[bool]:
    """``awaits_confirmation`` as SQL."""
    return or_(
        Subscriber.status == SubscriberStatus.pending,
        and_(Subscriber.status.in_(LEFT), Subscriber.resubscribe_requested_at.is_not(None)),
    )


def job_id(runtime: Runtime, subscriber_id: int, due_at: datetime) -> str:
    """One id per row and due time (in microseconds), so everyone who queues this try
    (the sign-up, the import, the reconciler) names the same job."""
    stamp = (due_at.astimezone(UTC) - EPOCH) // timedelta(microseconds=1)
    return runtime.keys.confirm_job_id(subscriber_id, stamp)


async def enqueue(runtime: Runtime, queue: Queue, owed: Owed, *, defer_s: float = 0) -> None:
    await queue.confirmation(owed.subscriber_id, job_id(runtime, *owed), defer_s=defer_s)


async def enqueue_owed(runtime: Runtime, queue: Queue, owed: Owed) -> None:
    """Queue the job of a mail the caller has just owed (a sign-up): one Redis round trip.

    The due time was set by this caller's own transaction, so no job of this id can be
    alive yet and arq's check for one (WATCH, three round trips) is left out.
    """
    await queue.confirmations([(owed.subscriber_id, job_id(runtime, *owed))])


async def requeue_due(runtime: Runtime, queue: Queue, limit: int = REQUEUE_LIMIT) -> int:
    """Queue every confirmation mail that is due and has no live job; how many were queued.

    The reconciler's part: reads only (no write lock on SQLite), then one or two Redis
    round trips. A lease that ran out is due too: its worker died mid-send.
    """
    async with runtime.reads() as session:
        rows = (
            await session.execute(
                select(Subscriber.id, Subscriber.confirm_due_at)
                .where(Subscriber.confirm_due_at <= utcnow(), awaiting())
                .order_by(Subscriber.confirm_due_at)
                .limit(limit)
            )
        ).all()
    jobs = [(sid, job_id(runtime, sid, due)) for sid, due in rows if due is not None]
    queued = await queue.confirmations(jobs, skip_live=True)
    if queued:
        log.info("reconciler: queued %d confirmation mails that had no live job", queued)
    return queued


async def _claim(runtime: Runtime, subscriber_id: int) -> tuple[str, int] | None:
    """Take the row for one try: (address, failed tries so far), or None when nothing is
    due (already sent, no longer wanted, or another job holds it)."""
    now = utcnow()
    async with runtime.sessions() as session:
        sub = await session.get(Subscriber, subscriber_id, with_for_update=True)
        if sub is None or sub.confirm_due_at is None:
            return None
        if not awaits_confirmation(sub):
            sub.confirm_due_at = None  # confirmed or left since: owed no more
            await session.commit()
            return None
        if sub.confirm_due_at > now + CLOCK_SLACK:
            return None
        sub.confirm_due_at = now + LEASE
        claimed = (sub.email, sub.confirm_attempts)  # the name stays out: a stranger typed it
        await session.commit()
    return claimed


async def _settle(
    runtime: Runtime, subscriber_id: int, kind: str, detail: str | None = None, **values: object
) -> None:
    """End this try: the row's new values and an event, in one transaction."""
    async with runtime.sessions() as session:
        await session.execute(
            update(Subscriber).where(Subscriber.id == subscriber_id).values(**values)
        )
        session.add(SubscriberEvent(subscriber_id=subscriber_id, kind=kind, detail=detail))
        await session.commit()


async def _failed(runtime: Runtime, subscriber_id: int, detail: str) -> str:
    await _settle(
        runtime,
        subscriber_id,
        "confirmation_failed",
        detail[:500],
        confirm_due_at=None,
        confirm_attempts=0,
    )
    return "failed"


async def _later(
    runtime: Runtime, queue: Queue, subscriber_id: int, attempts: int, reason: str
) -> str:
    """A try failed but the address is fine: owe the mail again after the backoff."""
    settings = runtime.settings
    attempts += 1
    if waited(attempts, settings.retry_base_s) >= settings.retry_max_age_s:
        log.warning("confirmation to subscriber %s given up: %s", subscriber_id, reason)
        return await _failed(runtime, subscriber_id, f"given up after {attempts} tries: {reason}")
    delay = retry_delay(attempts, settings.retry_base_s)
    due = utcnow() + timedelta(seconds=delay)
    async with runtime.sessions() as session:
        moved = await session.execute(
            update(Subscriber)
            .where(Subscriber.id == subscriber_id, Subscriber.confirm_due_at.is_not(None))
            .values(confirm_due_at=due, confirm_attempts=attempts)
        )
        await session.commit()
    if moved.rowcount == 1:  # type: ignore[attr-defined]
        # The reconciler would find it too; queued now, the try keeps its backoff exactly.
        await enqueue(runtime, queue, Owed(subscriber_id, due), defer_s=delay)
    return "retry"


async def send(
    runtime: Runtime, queue: Queue, smtp: SmtpPool, renderer: Renderer, subscriber_id: int
) -> str:
    """One try at the confirmation mail of one row; says how it ended."""
    claimed = await _claim(runtime, subscriber_id)
    if claimed is None:
        return "not due"
    email, attempts = claimed
    try:
        data = renderer.confirmation(to=email, confirm_url=runtime.confirm_url(subscriber_id))
    except ValueError as exc:  # a stored value that cannot go on the wire safely
        log.warning("confirmation to subscriber %s not sent: unusable stored value", subscriber_id)
        return await _failed(runtime, subscriber_id, str(exc))
    try:
        await smtp.send(runtime.settings.from_address, email, data)
    except TransientSendError as exc:
        log.info("confirmation to subscriber %s deferred: %s", subscriber_id, exc)
        return await _later(runtime, queue, subscriber_id, attempts, str(exc))
    except PolicyError as exc:
        # Our reputation or setup, not the address: try again later, never drop it.
        log.error("confirmation to subscriber %s refused by policy: %s", subscriber_id, exc)
        return await _later(runtime, queue, subscriber_id, attempts, f"policy: {exc}")
    except SmtpConfigError as exc:
        log.error("confirmation to subscriber %s not sent: %s", subscriber_id, exc)
        return await _later(runtime, queue, subscriber_id, attempts, str(exc))
    except PermanentSendError as exc:
        log.warning("confirmation to subscriber %s refused: %s", subscriber_id, exc.code)
        if not exc.suppress:
            return await _failed(runtime, subscriber_id, f"{exc.code} {exc.message}")
        async with runtime.sessions() as session:
            await mark_bounced(session, [subscriber_id], f"{exc.code} {exc.message}")
            await session.commit()
        return "bounced"
    await _settle(
        runtime,
        subscriber_id,
        "confirmation_sent",
        confirm_due_at=None,
        confirm_sent_at=utcnow(),
        confirm_attempts=0,
    )
    return "sent"
