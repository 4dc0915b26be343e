"""Send one batch of a blast: claim → still subscribed? → throttle → send → record.

A batch job owns a range of delivery ids. It claims due rows in small chunks
under a lease, re-checks each subscriber right before sending (unsubscribe
wins, invariant 3) and records outcomes every few messages. After a crash the
only repeats are messages that were sent but not yet recorded (invariant 2);
rows whose lease ran out go back to pending and the reconciler re-enqueues them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update

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
from mailer.render import CompiledMessage, Renderer, StatementContent, make_message_id
from mailer.runtime import Runtime
from mailer.smtp import (
    PermanentSendError,
    PolicyError,
    SendError,
    SmtpConfigError,
    SmtpPool,
    TransientSendError,
)
from mailer.subscriptions import mark_bounced
from mailer.throttle import Throttle
from mailer.worker import Queue, retry_delay

log = logging.getLogger("mailer.delivery")

FLUSH_EVERY = 20  # outcomes buffered before a write: also the bound on repeats after a crash
FLUSH_SECONDS = 0.2
CHUNK_UNLIMITED = 200  # rows claimed at once when nothing limits the rate
JOB_BUDGET_S = 60.0  # a job longer than this hands the rest of its range to a new job


@dataclass
class Outcome:
    delivery_id: int
    subscriber_id: int
    status: str
    code: int | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None
    suppress: bool = False
    policy: bool = False


@dataclass
class Claimed:
    delivery_id: int
    subscriber_id: int
    attempts: int
    first_attempt_at: datetime | None


@dataclass
class BatchReport:
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    retried: int = 0
    stopped: str | None = None
    outcomes: list[Outcome] = field(default_factory=list)


class Sender:
    """One per worker process: holds the SMTP pool, the throttle and compiled messages."""

    def __init__(
        self,
        runtime: Runtime,
        queue: Queue,
        smtp: SmtpPool,
        renderer: Renderer,
        throttle: Throttle | None = None,
    ) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.queue = queue
        self.smtp = smtp
        self.renderer = renderer
        self.throttle = throttle or Throttle.from_settings(runtime.redis, runtime.settings)
        self._compiled: OrderedDict[int, CompiledMessage] = OrderedDict()
        # One chunk at a time per process: the SMTP pool already bounds parallel sends, and a
        # single unflushed buffer per process is what bounds repeats after a crash.
        self._sending = asyncio.Lock()

    # Public entry point ------------------------------------------------------------

    async def run_batch(self, blast_id: int, first_id: int, last_id: int) -> str:
        started = time.monotonic()
        totals = BatchReport()
        while True:
            status = await self._blast_status(blast_id)
            if status != BlastStatus.sending:
                return f"blast {status}"
            if time.monotonic() - started > JOB_BUDGET_S:
                remaining = await self._next_due_id(blast_id, first_id, last_id)
                if remaining is not None:
                    job_id = self.runtime.keys.batch_job_id(blast_id, remaining)
                    await self.queue.batch(job_id, blast_id, remaining, last_id)
                return "continued"
            budget = max(1.0, JOB_BUDGET_S - (time.monotonic() - started))
            try:
                await asyncio.wait_for(self._sending.acquire(), budget)
            except TimeoutError:
                continue  # the budget check above hands the range on
            try:
                # Checked again under the lock: a pause may have landed while we waited.
                status = await self._blast_status(blast_id)
                if status != BlastStatus.sending:
                    return f"blast {status}"
                claimed = await self._claim(blast_id, first_id, last_id, self._chunk_size())
                if not claimed:
                    break
                keys = self.runtime.keys
                async with self.runtime.redis.pipeline(transaction=False) as pipe:
                    pipe.set(keys.blast_active(blast_id), 1, ex=self._active_ttl())
                    pipe.delete(keys.blast_idle(blast_id))
                    await pipe.execute()
                report = await self._send_chunk(blast_id, claimed)
            finally:
                self._sending.release()
            totals.sent += report.sent
            totals.failed += report.failed
            totals.skipped += report.skipped
            totals.retried += report.retried
            if report.stopped:
                return report.stopped
        await finish_if_complete(self.runtime, blast_id)
        return (
            f"sent {totals.sent} failed {totals.failed} skipped {totals.skipped} "
            f"retry {totals.retried}"
        )

    # Claiming ------------------------------------------------------------------------

    def _chunk_size(self) -> int:
        rate = self.settings.rate_per_second
        if rate <= 0:
            return min(CHUNK_UNLIMITED, self.settings.batch_size)
        # About five seconds of sending, so a pause takes effect quickly.
        return max(1, min(self.settings.batch_size, int(rate * 5)))

    def _active_ttl(self) -> int:
        return max(3, 3 * self.settings.reconcile_interval_s)

    async def _blast_status(self, blast_id: int) -> str | None:
        async with self.runtime.sessions() as session:
            return await session.scalar(select(Blast.status).where(Blast.id == blast_id))

    async def _next_due_id(self, blast_id: int, first_id: int, last_id: int) -> int | None:
        async with self.runtime.sessions() as session:
            return await session.scalar(
                select(func.min(Delivery.id)).where(
                    Delivery.blast_id == blast_id,
                    Delivery.id.between(first_id, last_id),
                    Delivery.status == DeliveryStatus.pending,
                )
            )

    async def _claim(self, blast_id: int, first_id: int, last_id: int, limit: int) -> list[Claimed]:
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.delivery_lease_s)
        async with self.runtime.sessions() as session:
            ids = (
                select(Delivery.id)
                .where(
                    Delivery.blast_id == blast_id,
                    Delivery.id.between(first_id, last_id),
                    Delivery.status == DeliveryStatus.pending,
                    or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
                )
                .order_by(Delivery.id)
                .limit(limit)
            )
            if self.runtime.engine.dialect.name == "postgresql":
                ids = ids.with_for_update(skip_locked=True)
            rows = await session.execute(
                update(Delivery)
                .where(Delivery.id.in_(ids.scalar_subquery()))
                .where(Delivery.status == DeliveryStatus.pending)
                .values(
                    status=DeliveryStatus.sending,
                    lease_until=lease,
                    first_attempt_at=func.coalesce(Delivery.first_attempt_at, now),
                )
                .returning(
                    Delivery.id,
                    Delivery.subscriber_id,
                    Delivery.attempts,
                    Delivery.first_attempt_at,
                )
            )
            claimed = [Claimed(r[0], r[1], r[2], r[3]) for r in rows if r[1] is not None]
            await session.commit()
        claimed.sort(key=lambda c: c.delivery_id)
        return claimed

    # Sending -------------------------------------------------------------------------

    async def _compiled_for(self, blast_id: int) -> CompiledMessage:
        if blast_id in self._compiled:
            self._compiled.move_to_end(blast_id)
            return self._compiled[blast_id]
        async with self.runtime.sessions() as session:
            statement = await session.scalar(
                select(Statement)
                .join(Blast, Blast.statement_id == Statement.id)
                .where(Blast.id == blast_id)
            )
        if statement is None:
            raise LookupError(f"blast {blast_id} has no statement")
        compiled = self.renderer.compile_statement(
            StatementContent.from_model(statement), blast_id=blast_id
        )
        self._compiled[blast_id] = compiled
        while len(self._compiled) > 8:
            self._compiled.popitem(last=False)
        return compiled

    async def _still_subscribed(self, subscriber_ids: list[int]) -> dict[int, str]:
        """Addresses of the given subscribers that are still confirmed, read right now."""
        async with self.runtime.sessions() as session:
            rows = await session.execute(
                select(Subscriber.id, Subscriber.email).where(
                    Subscriber.id.in_(subscriber_ids),
                    Subscriber.status == SubscriberStatus.confirmed,
                )
            )
            return {r[0]: r[1] for r in rows}

    async def _send_chunk(self, blast_id: int, claimed: list[Claimed]) -> BatchReport:
        compiled = await self._compiled_for(blast_id)
        recorder = Recorder(self, blast_id)
        # A first bulk read drops those who left since the snapshot and tells each domain;
        # every group is read again right before it is sent (unsubscribe wins).
        addresses = await self._still_subscribed([c.subscriber_id for c in claimed])
        for item in claimed:
            if item.subscriber_id not in addresses:
                await recorder.add(Outcome(item.delivery_id, item.subscriber_id, "skipped"))
        claimed = [c for c in claimed if c.subscriber_id in addresses]
        granted = await self.throttle.take_daily(len(claimed))
        if granted < len(claimed):
            await self._defer_for_quota(blast_id, claimed[granted:])
            claimed = claimed[:granted]

        work: asyncio.Queue[Claimed] = asyncio.Queue()
        for item in claimed:
            work.put_nowait(item)
        limited = self.settings.rate_per_second > 0 or bool(self.settings.domain_rates)
        group = 1 if limited else 16
        stop: list[str] = []
        attempted: list[int] = []

        async def lane() -> None:
            while not work.empty() and not stop:
                items = [work.get_nowait() for _ in range(min(group, work.qsize()))]
                if limited:
                    domain = addresses[items[0].subscriber_id].rpartition("@")[2]
                    await self.throttle.acquire(len(items), domain)
                alive = await self._still_subscribed([c.subscriber_id for c in items])
                for item in items:
                    email = alive.get(item.subscriber_id)
                    if email is None:
                        await recorder.add(Outcome(item.delivery_id, item.subscriber_id, "skipped"))
                        continue
                    attempted.append(1)
                    outcome = await self._send_one(compiled, blast_id, item, email)
                    if outcome is None:  # the relay itself is unusable: stop this batch
                        stop.append("smtp configuration error")
                        await recorder.release([item, *self._drain(work)])
                        return
                    await recorder.add(outcome)

        await asyncio.gather(*(lane() for _ in range(self.smtp.size)))
        await recorder.flush()
        if self.settings.daily_quota and granted > len(attempted):
            # Quota is for mail that went out, not for people who left or a stopped batch.
            await self.throttle.release_daily(granted - len(attempted))
        report = recorder.report
        if stop:
            report.stopped = stop[0]
        if recorder.paused_reason:
            report.stopped = "paused: " + recorder.paused_reason
        return report

    @staticmethod
    def _drain(work: asyncio.Queue[Claimed]) -> list[Claimed]:
        items = []
        while not work.empty():
            items.append(work.get_nowait())
        return items

    def envelope_sender(self, subscriber_id: int) -> str:
        return self.settings.from_address

    async def _send_one(
        self, compiled: CompiledMessage, blast_id: int, item: Claimed, email: str
    ) -> Outcome | None:
        try:
            data = compiled.build(
                to=email,
                unsubscribe_url=self.runtime.unsubscribe_url(item.subscriber_id),
                message_id=make_message_id(self.settings, blast_id, item.subscriber_id),
            )
        except ValueError as exc:  # an address or URL that cannot be put on the wire
            return Outcome(item.delivery_id, item.subscriber_id, "failed", None, str(exc)[:200])
        try:
            await self.smtp.send(self.envelope_sender(item.subscriber_id), email, data)
        except SmtpConfigError as exc:
            await pause_blast(self.runtime, blast_id, f"SMTP relay unusable: {exc}")
            return None
        except TransientSendError as exc:
            return self._transient(item, exc)
        except PolicyError as exc:
            return Outcome(
                item.delivery_id, item.subscriber_id, "failed", exc.code, exc.message, policy=True
            )
        except PermanentSendError as exc:
            return Outcome(
                item.delivery_id,
                item.subscriber_id,
                "failed",
                exc.code,
                exc.message,
                suppress=exc.suppress,
            )
        except SendError as exc:  # pragma: no cover - every SendError is one of the above
            return self._transient(item, exc)
        return Outcome(item.delivery_id, item.subscriber_id, "sent")

    def _transient(self, item: Claimed, exc: SendError) -> Outcome:
        now = utcnow()
        first = item.first_attempt_at or now
        if (now - first).total_seconds() >= self.settings.retry_max_age_s:
            return Outcome(
                item.delivery_id, item.subscriber_id, "failed", exc.code, f"gave up: {exc.message}"
            )
        delay = retry_delay(item.attempts + 1, self.settings.retry_base_s)
        return Outcome(
            item.delivery_id,
            item.subscriber_id,
            "retry",
            exc.code,
            exc.message,
            next_attempt_at=now + timedelta(seconds=delay),
        )

    async def _defer_for_quota(self, blast_id: int, items: list[Claimed]) -> None:
        wait = max(1.0, await self.throttle.daily_resets_in())
        until = utcnow() + timedelta(seconds=wait)
        async with self.runtime.sessions() as session:
            await session.execute(
                update(Delivery)
                .where(Delivery.id.in_([c.delivery_id for c in items]))
                .values(status=DeliveryStatus.pending, lease_until=None, next_attempt_at=until)
            )
            await session.execute(
                update(Blast)
                .where(Blast.id == blast_id)
                .values(
                    reason=f"waiting: daily quota of {self.settings.daily_quota} reached; "
                    f"resumes at {until.strftime('%Y-%m-%d %H:%M:%S')} UTC"
                )
            )
            await session.commit()


class Recorder:
    """Buffers outcomes and writes them in bulk, every FLUSH_EVERY messages or FLUSH_SECONDS."""

    def __init__(self, sender: Sender, blast_id: int) -> None:
        self.sender = sender
        self.runtime = sender.runtime
        self.blast_id = blast_id
        self.buffer: list[Outcome] = []
        self.last_flush = time.monotonic()
        self.report = BatchReport()
        self.paused_reason: str | None = None
        self._lock = asyncio.Lock()

    async def add(self, outcome: Outcome) -> None:
        self.buffer.append(outcome)
        if len(self.buffer) >= FLUSH_EVERY or time.monotonic() - self.last_flush > FLUSH_SECONDS:
            await self.flush()

    async def release(self, items: list[Claimed]) -> None:
        """Give claimed rows back untouched (nothing was sent to them)."""
        await self.flush()
        async with self.runtime.sessions() as session:
            await session.execute(
                update(Delivery)
                .where(Delivery.id.in_([c.delivery_id for c in items]))
                .values(status=DeliveryStatus.pending, lease_until=None)
            )
            await session.commit()

    async def flush(self) -> None:
        async with self._lock:
            batch, self.buffer = self.buffer, []
            self.last_flush = time.monotonic()
            if batch:
                await self._write(batch)

    async def _write(self, batch: list[Outcome]) -> None:
        now = utcnow()
        by_status: dict[str, list[int]] = {}
        for o in batch:
            by_status.setdefault(o.status, []).append(o.delivery_id)
        policy = [o for o in batch if o.policy]
        bounced = [o for o in batch if o.suppress]
        async with self.runtime.sessions() as session:
            if ids := by_status.get("sent"):
                await session.execute(
                    update(Delivery)
                    .where(Delivery.id.in_(ids))
                    .values(status=DeliveryStatus.sent, sent_at=now, lease_until=None)
                )
            if ids := by_status.get("skipped"):
                await session.execute(
                    update(Delivery)
                    .where(Delivery.id.in_(ids))
                    .values(status=DeliveryStatus.skipped, lease_until=None)
                )
            for o in batch:
                if o.status == "failed":
                    values: dict[str, Any] = {"status": DeliveryStatus.failed}
                elif o.status == "retry":
                    values = {
                        "status": DeliveryStatus.pending,
                        "next_attempt_at": o.next_attempt_at,
                        "attempts": Delivery.attempts + 1,
                    }
                else:
                    continue
                values.update(lease_until=None, last_code=o.code, last_error=(o.error or "")[:500])
                await session.execute(
                    update(Delivery).where(Delivery.id == o.delivery_id).values(**values)
                )
            if bounced:
                await mark_bounced(
                    session,
                    [o.subscriber_id for o in bounced],
                    f"blast {self.blast_id}: {bounced[0].code} {bounced[0].error}",
                )
            if policy:
                await self._count_policy(session, policy)
            await session.commit()
        counts = {s: len(ids) for s, ids in by_status.items()}
        self.report.sent += counts.get("sent", 0)
        self.report.failed += counts.get("failed", 0)
        self.report.skipped += counts.get("skipped", 0)
        self.report.retried += counts.get("retry", 0)
        await self._count_in_redis(counts)

    async def _count_policy(self, session: Any, policy: list[Outcome]) -> None:
        limit = self.runtime.settings.policy_failures_pause
        await session.execute(
            update(Blast)
            .where(Blast.id == self.blast_id)
            .values(policy_failures=Blast.policy_failures + len(policy))
        )
        failures = await session.scalar(
            select(Blast.policy_failures).where(Blast.id == self.blast_id)
        )
        if failures is not None and failures >= limit:
            last = policy[-1]
            reason = (
                f"paused after {failures} policy rejections by the receiving servers "
                f"(last: {last.code} {last.error}); the sender's reputation or "
                f"authentication needs attention before resuming"
            )
            result = await session.execute(
                update(Blast)
                .where(and_(Blast.id == self.blast_id, Blast.status == BlastStatus.sending))
                .values(status=BlastStatus.paused, reason=reason[:500])
            )
            if result.rowcount:
                log.error("blast %s paused: %s", self.blast_id, reason)
            self.paused_reason = reason

    async def _count_in_redis(self, counts: dict[str, int]) -> None:
        """Process-independent counters, summed across every worker, for /metrics."""
        keys = self.runtime.keys
        second = int(time.time())
        async with self.runtime.redis.pipeline(transaction=False) as pipe:
            for status, n in counts.items():
                pipe.hincrby(keys.counters, f"messages_{status}", n)
            if counts.get("sent"):
                pipe.hincrby(keys.sent_log, str(second), counts["sent"])
            await pipe.execute()


async def pause_blast(runtime: Runtime, blast_id: int, reason: str) -> None:
    async with runtime.sessions() as session:
        result = await session.execute(
            update(Blast)
            .where(Blast.id == blast_id, Blast.status == BlastStatus.sending)
            .values(status=BlastStatus.paused, reason=reason[:500])
        )
        await session.commit()
    if result.rowcount:  # type: ignore[attr-defined]
        log.error("blast %s paused: %s", blast_id, reason)


async def finish_if_complete(runtime: Runtime, blast_id: int) -> bool:
    """Mark the blast done once no row is pending or in flight."""
    async with runtime.sessions() as session:
        open_rows = (
            select(Delivery.id)
            .where(
                Delivery.blast_id == blast_id,
                Delivery.status.in_([DeliveryStatus.pending, DeliveryStatus.sending]),
            )
            .exists()
        )
        result = await session.execute(
            update(Blast)
            .where(Blast.id == blast_id, Blast.status == BlastStatus.sending, ~open_rows)
            .values(status=BlastStatus.done, finished_at=utcnow(), reason=None)
        )
        await session.commit()
    done = bool(result.rowcount)  # type: ignore[attr-defined]
    if done:
        log.info("blast %s done", blast_id)
    return done
