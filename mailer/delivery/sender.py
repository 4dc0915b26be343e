"""Send one batch of a blast: claim → still subscribed? → throttle → send → record.

A batch job owns a range of delivery ids. It claims due rows in small chunks
under a lease (``delivery.claims``), re-checks each subscriber right before
sending (unsubscribe wins: docs/design.md, invariant 3), hands the messages to
``delivery.transmit`` (one by one when rate-limited, else a group as SMTP chains)
and records outcomes
every few messages. After a crash the only repeats are messages that were sent
but not yet recorded (docs/design.md, invariant 2); rows whose lease ran out go
back to pending and the reconciler re-enqueues them. Rows the batch itself hands
back for later (retries, a slow domain's excess, the daily quota) it queues again
for when they are due (``Sender._follow_up``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select

from mailer.blast_state import clear_waiting, finish_if_complete
from mailer.db import ids_in, single_reads, utcnow
from mailer.delivery.claims import Claimed, Claims, split_by_domain
from mailer.delivery.status import BlastStatuses
from mailer.delivery.transmit import Transmitter, outcome_for
from mailer.driver_sql import DriverStatement, fetch, on_driver
from mailer.models import (
    Blast,
    BlastStatus,
    DeliveryStatus,
    Statement,
    Subscriber,
    SubscriberStatus,
)
from mailer.queue import Queue
from mailer.record import Outcome, Read, Recorder
from mailer.render import CompiledMessage, Renderer, StatementContent
from mailer.runtime import Runtime
from mailer.smtp import SmtpPool
from mailer.stats import OutcomeStatus
from mailer.throttle import MAX_REBOOKS, Throttle

log = logging.getLogger("mailer.delivery")

# Rows claimed at once when nothing limits the rate (a whole batch at the defaults). Each
# chunk costs a claim, a bulk re-check and a last flush; chunks of 200 cost 7 % more CPU
# per message (bench/analysis.md, step 10). A pause still acts within a group of 16.
CHUNK_UNLIMITED = 500
GROUP_UNLIMITED = 16  # messages a lane re-checks in one query and sends when unlimited
JOB_BUDGET_S = 60.0  # a job longer than this hands the rest of its range to a new job


# The re-check, built once per dialect (db.ids_in).
_STILL_SUBSCRIBED = {
    postgres: select(Subscriber.id, Subscriber.email).where(
        ids_in(Subscriber.id, "ids", postgres=postgres),
        Subscriber.status == SubscriberStatus.confirmed,
    )
    for postgres in (False, True)
}


@dataclass
class BatchReport:
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    retried: int = 0
    stopped: str | None = None


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
        # One recorder per process: its single unflushed buffer is what bounds the repeats
        # after a crash, however many batch jobs run here at once.
        self.recorder = Recorder(runtime)
        self.statuses = BlastStatuses(runtime)  # pause and cancel, read once per 0.25 s
        self._reader = single_reads(runtime.engine)  # one round trip per re-check
        self._still = _STILL_SUBSCRIBED[runtime.engine.dialect.name == "postgresql"]
        self._still_driver = (  # asyncpg runs it itself: about half the CPU (driver_sql)
            DriverStatement.cached(self._still, runtime.engine.dialect)
            if on_driver(runtime.engine)
            else None
        )
        self.claims = Claims(runtime)
        self.transmit = Transmitter(runtime, smtp, self.recorder.stats)

    # Public entry point ------------------------------------------------------------

    async def run_batch(self, blast_id: int, first_id: int, last_id: int) -> str:
        started = time.monotonic()
        totals = BatchReport()
        while True:
            status = await self.statuses.current(blast_id)
            if status != BlastStatus.sending:
                return f"blast {status}"
            if time.monotonic() - started > JOB_BUDGET_S:
                remaining = await self.claims.next_due_id(blast_id, first_id, last_id)
                if remaining is not None:
                    job_id = self.runtime.keys.batch_job_id(blast_id, remaining)
                    await self.queue.batch(job_id, blast_id, remaining, last_id)
                return "continued"
            claimed = await self.claims.claim(blast_id, first_id, last_id, self._chunk_size())
            if not claimed:
                break
            keys = self.runtime.keys
            async with self.runtime.redis.pipeline(transaction=False) as pipe:
                pipe.set(keys.blast_active(blast_id), 1, ex=self._active_ttl())
                pipe.delete(keys.blast_idle(blast_id))
                await pipe.execute()
            await clear_waiting(self.runtime, blast_id)
            report = await self._send_chunk(blast_id, claimed)
            totals.sent += report.sent
            totals.failed += report.failed
            totals.skipped += report.skipped
            totals.retried += report.retried
            if report.stopped:
                return report.stopped
        if not await finish_if_complete(self.runtime, blast_id):
            await self._follow_up(blast_id, first_id, last_id)
        return (
            f"sent {totals.sent} failed {totals.failed} skipped {totals.skipped} "
            f"retry {totals.retried}"
        )

    async def _follow_up(self, blast_id: int, first_id: int, last_id: int) -> None:
        """Queue the range again for when its first handed-back row is due, instead of
        leaving it to the reconciler (three idle intervals, 30 s at the defaults). The
        job id holds the due time: one job per range and time (docs/design.md, arq).
        """
        due = await self.claims.next_attempt_at(blast_id, first_id, last_id)
        if due is None:
            return
        due_ms = int(due.timestamp() * 1000)
        job_id = self.runtime.keys.batch_follow_up_job_id(blast_id, first_id, due_ms)
        wait = max(0.0, (due - utcnow()).total_seconds())
        await self.queue.batch(job_id, blast_id, first_id, last_id, defer_s=wait)

    # Claiming ------------------------------------------------------------------------

    def _chunk_size(self) -> int:
        rate = self.settings.rate_per_second
        if rate <= 0:
            return min(CHUNK_UNLIMITED, self.settings.batch_size)
        # About five seconds of sending, so a pause takes effect quickly.
        return max(1, min(self.settings.batch_size, int(rate * 5)))

    def _active_ttl(self) -> int:
        return max(3, 3 * self.settings.reconcile_interval_s)

    # Sending -------------------------------------------------------------------------

    async def _compiled_for(self, blast_id: int) -> CompiledMessage:
        if blast_id in self._compiled:
            self._compiled.move_to_end(blast_id)
            return self._compiled[blast_id]
        async with self.runtime.reads() as session:
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
        # No transaction on PostgreSQL (db.single_reads) and a statement built once: this
        # runs for every group of messages (every one when rate-limited), P3.
        if self._still_driver is not None:
            rows = await fetch(self.runtime.engine, self._still_driver, {"ids": subscriber_ids})
            return {r[0]: r[1] for r in rows}
        async with self._reader.connect() as conn:
            result = await conn.execute(self._still, {"ids": subscriber_ids})
            return {r[0]: r[1] for r in result}

    def _recheck(self, subscriber_ids: list[int]) -> Read | None:
        """The re-check as a read the recorder can run in a flush's round trip (asyncpg)."""
        if self._still_driver is None:
            return None
        return (self._still, {"ids": subscriber_ids})

    async def _send_chunk(self, blast_id: int, claimed: list[Claimed]) -> BatchReport:
        compiled = await self._compiled_for(blast_id)
        report = BatchReport()
        recorder = self.recorder

        unsent = {c.delivery_id for c in claimed}

        async def record(outcome: Outcome, *, reserved: bool = False) -> None:
            field = outcome.status.counter
            setattr(report, field, getattr(report, field) + 1)
            unsent.discard(outcome.delivery_id)
            await recorder.add(outcome, reserved=reserved)

        # A first bulk read drops those who left since the snapshot and tells each domain;
        # every message is checked again right before it is sent (unsubscribe wins).
        addresses = await self._still_subscribed([c.subscriber_id for c in claimed])
        for item in claimed:
            if item.subscriber_id not in addresses:
                await record(outcome_for(blast_id, item, OutcomeStatus.skipped))
        general, by_domain = split_by_domain(
            [c for c in claimed if c.subscriber_id in addresses],
            addresses,
            self.settings.domain_rates,
        )
        await self.claims.defer_domain_excess(by_domain)
        ready = general + [c for items in by_domain.values() for c in items]
        granted = await self.throttle.take_daily(len(ready))
        if granted < len(ready):
            late = set(id(c) for c in ready[granted:])
            await self._defer_for_quota(blast_id, ready[granted:])
            general = [c for c in general if id(c) not in late]
            by_domain = {d: [c for c in v if id(c) not in late] for d, v in by_domain.items()}

        stop: list[str] = []
        attempted: list[int] = []

        async def halted(items: list[Claimed], rest: list[Claimed]) -> bool:
            """Paused or cancelled: hand the rows back, and stop the batch."""
            status = await self.statuses.current(blast_id)
            if status == BlastStatus.sending:
                return False
            stop.append(f"blast {status}")
            back = DeliveryStatus.pending
            if status == BlastStatus.cancelled:
                back = DeliveryStatus.cancelled
            await recorder.release([c.delivery_id for c in (*items, *rest)], back)
            rest.clear()
            return True

        async def send_group(items: list[Claimed], rest: list[Claimed]) -> bool:
            """Re-check and send a group as chains (docs/smtp.md); False: the batch stops."""
            if await halted(items, rest):
                return False
            ids = [c.subscriber_id for c in items]
            # Places in the recorder's buffer first (they bound what a crash can repeat,
            # record.py). If a flush makes the room, the re-check rides in its round trip.
            checked = await recorder.reserve(len(items), read=self._recheck(ids))
            held = len(items)  # places not yet taken by an outcome or given back
            try:
                if checked is not None:
                    alive = {r[0]: r[1] for r in checked}
                else:
                    alive = await self._still_subscribed(ids)
                group = []
                for item in items:
                    email = alive.get(item.subscriber_id)
                    if email is not None:
                        group.append((item, email))
                        continue
                    held -= 1
                    await record(outcome_for(blast_id, item, OutcomeStatus.skipped), reserved=True)
                outcomes, unsent = await self.transmit.chain(compiled, blast_id, group)
                for outcome in outcomes:
                    held -= 1
                    attempted.append(1)
                    await record(outcome, reserved=True)
                if unsent:  # the relay is unusable: the blast is paused
                    stop.append("smtp configuration error")
                    await recorder.release([c.delivery_id for c in (*unsent, *rest)])
                    rest.clear()
                    return False
                return True
            finally:
                if held:
                    recorder.unreserve(held)

        async def send(items: list[Claimed], domain: str | None, rest: list[Claimed]) -> bool:
            """Reserve, throttle, re-check, send, record; False once the batch must stop."""
            # Places in the recorder's buffer first (they bound what a crash can repeat,
            # record.py): a flush waited for after the slot would make the send late.
            await recorder.reserve(len(items))
            held = len(items)  # places not yet taken by an outcome or given back
            try:
                # The connection is taken before the slot (SmtpPool.held): between the late
                # check and the write there is then nothing to wait for.
                async with self.smtp.held() as conn:
                    for attempt in range(1, MAX_REBOOKS + 1):
                        slot = await self.throttle.acquire(len(items), domain)
                        recorder.stats.throttle_wait_s += slot.waited
                        if await halted(items, rest):
                            return False
                        alive = await self._still_subscribed([c.subscriber_id for c in items])
                        # The re-check ran after the slot (unsubscribe wins); if it took too
                        # long the message would land among later slots: book a new one.
                        if attempt == MAX_REBOOKS or not slot.late():
                            break
                    for item in items:
                        held -= 1  # this item's place: its outcome takes it, or is given back
                        email = alive.get(item.subscriber_id)
                        if email is None:
                            skipped = outcome_for(blast_id, item, OutcomeStatus.skipped)
                            await record(skipped, reserved=True)
                            continue
                        attempted.append(1)
                        try:
                            sent = await self.transmit.one(compiled, blast_id, item, email, conn)
                        except BaseException:
                            recorder.unreserve()
                            raise
                        if sent is None:
                            recorder.unreserve()
                            stop.append("smtp configuration error")
                            await recorder.release([c.delivery_id for c in (item, *rest)])
                            rest.clear()
                            return False
                        await record(sent, reserved=True)
                    return True
            finally:
                if held:
                    recorder.unreserve(held)

        # Unlimited domains share the SMTP lanes; a group is re-checked in one query.
        limited = self.settings.rate_per_second > 0
        group = 1 if limited else GROUP_UNLIMITED
        shared = list(general)

        async def lane() -> None:
            while shared and not stop:
                items, shared[:] = shared[:group], shared[group:]
                sent = await (send(items, None, shared) if limited else send_group(items, shared))
                if not sent:
                    return

        # Each rate-limited domain gets one sequential task, so waiting for its slots never
        # holds up the lanes of other domains.
        async def domain_task(domain: str, items: list[Claimed]) -> None:
            while items and not stop:
                if not await send([items.pop(0)], domain, items):
                    return

        if limited or by_domain:
            await self.smtp.warm()  # connections open before the first slot is booked
        renewal = asyncio.create_task(self.claims.keep_leases(unsent))
        try:
            await asyncio.gather(
                *(lane() for _ in range(self.smtp.size)),
                *(domain_task(d, list(v)) for d, v in by_domain.items()),
            )
        finally:
            renewal.cancel()
        await recorder.flush(final=True)
        if self.settings.daily_quota and granted > len(attempted):
            # Quota is for mail that went out, not for people who left or a stopped batch.
            await self.throttle.release_daily(granted - len(attempted))
        if stop:
            report.stopped = stop[0]
        if blast_id in recorder.paused:
            report.stopped = "paused: " + recorder.paused.pop(blast_id)
        return report

    async def _defer_for_quota(self, blast_id: int, items: list[Claimed]) -> None:
        wait = max(1.0, await self.throttle.daily_resets_in())
        until = utcnow() + timedelta(seconds=wait)
        await self.claims.defer(
            items,
            until,
            blast_id=blast_id,
            waiting=f"daily quota of {self.settings.daily_quota} reached; "
            f"resumes at {until.strftime('%Y-%m-%d %H:%M:%S')} UTC",
        )
