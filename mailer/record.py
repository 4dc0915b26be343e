"""Record outcomes: the last stage of a message's path, written in bulk.

Sent, skipped, failed or to-retry, every outcome ends here. Writes are batched
(one UPDATE per status per flush, in one transaction: docs/recording.md), because
a row per message per statement would cap throughput; the price is that a crash
can repeat what sat in the buffer, which is why the buffer is small and shared
per process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Select, Update, update
from sqlalchemy.ext.asyncio import AsyncSession

from mailer import record_sql
from mailer.blast_state import count_policy_failures
from mailer.bounces import BounceEvent, apply_events, send_event
from mailer.db import single_writes, utcnow
from mailer.driver_sql import DriverStatement, execute, fetch, on_driver
from mailer.models import Delivery, DeliveryStatus
from mailer.runtime import Runtime
from mailer.stats import OutcomeStatus, SendStats

log = logging.getLogger("mailer.record")

# A single-statement read to run in the round trip of a flush, and its values.
Read = tuple[Select[*tuple[Any, ...]], dict[str, Any]]

FLUSH_EVERY = 20  # outcomes buffered before a write: also the bound on repeats after a crash
FLUSH_SECONDS = 0.2
# The Redis counters of outcomes (/metrics, `mailer status`) are written at most this often,
# and by the flush that ends a chunk: once per flush they cost about 8 % of a worker's CPU
# per message (bench/analysis.md, step 9). SQL, not Redis, says what was sent.
COUNTERS_SECONDS = 0.25


@dataclass
class Outcome:
    blast_id: int
    delivery_id: int
    subscriber_id: int
    status: OutcomeStatus
    code: int | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None
    suppress: bool = False
    policy: bool = False


class Recorder:
    """Buffers outcomes and writes them in bulk, every FLUSH_EVERY messages or FLUSH_SECONDS.

    One per worker process, shared by every batch running there. A send first reserves its
    place in the buffer (``reserve``), so what was sent but is not yet written is at most
    the buffer being written plus the one filling, FLUSH_EVERY each, whatever the number
    of concurrent jobs and lanes (docs/design.md, invariant 2).
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.buffer: list[Outcome] = []
        self.last_flush = time.monotonic()
        self.counted_at = time.monotonic()  # when the Redis counters were last written
        self._counts: Counter[str] = Counter()  # outcome status -> n, not yet in Redis
        self._blast_counts: Counter[tuple[int, str]] = Counter()
        self._sent_at: Counter[int] = Counter()  # second -> messages sent then
        self.paused: dict[int, str] = {}  # blast id -> reason, for batches to notice
        self.stats = SendStats()  # SMTP latency and throttle waits, written with each flush
        self._lock = asyncio.Lock()
        self._reserved = 0  # sends under way whose outcome is not in the buffer yet
        self._waiting: deque[asyncio.Future[None]] = deque()  # lanes in ``reserve``
        self._postgres = runtime.engine.dialect.name == "postgresql"
        self._single = single_writes(runtime.engine)
        self._joins_reads = self._single is not None and on_driver(runtime.engine)

    def _due(self) -> bool:
        return len(self.buffer) >= FLUSH_EVERY or time.monotonic() - self.last_flush > FLUSH_SECONDS

    async def reserve(self, n: int = 1, *, read: Read | None = None) -> list[Any] | None:
        """Wait for ``n`` places in the buffer before sending ``n`` messages.

        Without it, while a slow write held the lock every lane of every job could finish
        one more send into the next buffer, and a crash then repeated one message per lane
        beyond the bound (seen: 136 repeats over three kills against a bound of 132).
        The ``n`` places are taken at once, so lanes holding part of what they need can
        never wait on each other; a block larger than the buffer goes when it is empty.
        A rate-limited sender reserves before it books its slot: a flush run here would
        otherwise sit between the slot and the send, and a late send can overfill a
        one-second window.

        ``read`` is a statement to run right after this wait, such as the sender's
        re-check (docs/design.md, invariant 3). If the places come from the usual flush
        on PostgreSQL, they are taken as the flush begins (no other lane can take them
        while it runs) and the read goes in the flush's statement
        (``record_sql.sent_then``): its rows come back. Otherwise None: the caller reads.
        """
        while len(self.buffer) + self._reserved + n > FLUSH_EVERY and (
            self.buffer or self._reserved
        ):
            # A flush only helps when it makes room: with the sends under way still in the
            # way, writing the few outcomes that came in meanwhile bought nothing, and every
            # lane waiting here did it again on each outcome (1,477 flushes of ~3 outcomes
            # for 4,860 in the 2000-message fault test). Wait for the sends instead.
            if self.buffer and (self._reserved + n <= FLUSH_EVERY or not self._reserved):
                rows = await self.flush(read=read, take=n)
                if rows is not None:  # the places came with the flush, the read rode in it
                    self._wake()
                    return rows
            else:  # the places are taken by sends under way: wait for one to come in
                await self._turn()
        self._reserved += n
        self._wake()  # there may be room left for the next lane in line
        return None

    async def _turn(self) -> None:
        """Wait for a change (an outcome in, a place given back, a flush) and our turn.

        Each change wakes one waiting lane, not all of them: with ten jobs of ten lanes
        each, up to a hundred lanes wait here, and waking every one on every outcome to
        find the places still taken cost the worker about a quarter more CPU per message
        (968 against 781 µs, bench/analysis.md, "Round two, step 7"). A lane that gets its
        places wakes the next (``reserve``), so room for several is handed on, one lane
        after another.
        """
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn
        except BaseException:
            self._waiting.remove(turn)
            if turn.done() and not turn.cancelled():
                self._wake()  # woken, then cancelled: the turn goes to the next lane
            raise
        self._waiting.remove(turn)

    def _wake(self) -> None:
        """Give the first waiting lane a look, unless it already has one coming."""
        if self._waiting and not self._waiting[0].done():
            self._waiting[0].set_result(None)

    def unreserve(self, n: int = 1) -> None:
        """Reserved sends that end with no outcome (cancelled, or the relay unusable)."""
        self._reserved -= n
        self._wake()

    async def add(self, outcome: Outcome, *, reserved: bool = False) -> None:
        if reserved:
            self._reserved -= 1
        self.buffer.append(outcome)
        self._wake()
        if self._due():
            await self.flush(only_if_due=True)

    async def release(
        self, delivery_ids: list[int], status: DeliveryStatus = DeliveryStatus.pending
    ) -> None:
        """Give claimed rows back untouched (nothing was sent to them), or cancel them."""
        await self.flush()
        async with self.runtime.sessions() as session:
            await session.execute(
                update(Delivery)
                .where(Delivery.id.in_(delivery_ids), Delivery.status == DeliveryStatus.sending)
                .values(status=status, lease_until=None)
            )
            await session.commit()

    async def flush(
        self,
        *,
        only_if_due: bool = False,
        final: bool = False,
        read: Read | None = None,
        take: int = 0,
    ) -> list[Any] | None:
        """Write the buffer; ``final`` (a chunk's last flush) also writes the counters.

        With ``read`` and ``take`` (``reserve``): if the read can ride in this flush's
        statement and the emptied buffer leaves room, ``take`` places are taken now and
        the read's rows are returned; else None, and nothing was taken."""
        rows = None
        async with self._lock:
            # Lanes that queued behind a flush find the buffer already written: without
            # this check each would write the few outcomes added meanwhile (a convoy).
            if only_if_due and not self._due():
                return None
            batch, self.buffer = self.buffer, []
            self.last_flush = time.monotonic()
            room = self._reserved + take <= FLUSH_EVERY or not self._reserved
            if not (read is not None and take and room and self._carries_read(batch)):
                read, take = None, 0
            self._reserved += take
            try:
                if batch:
                    rows = await self._write(batch, read)
            except BaseException:
                self._reserved -= take
                raise
            if final or self.last_flush - self.counted_at >= COUNTERS_SECONDS:
                await self._count_in_redis()
        self._wake()  # the buffer has room again
        return rows

    def _carries_read(self, batch: list[Outcome]) -> bool:
        """Whether ``batch`` is written as the usual flush, one UPDATE that asyncpg runs
        outside a transaction, which a read can join (``record_sql.sent_then``)."""
        sent = OutcomeStatus.sent
        return self._joins_reads and bool(batch) and all(o.status == sent for o in batch)

    async def _write(self, batch: list[Outcome], read: Read | None = None) -> list[Any] | None:
        now = utcnow()
        rows = None
        blasts = sorted({o.blast_id for o in batch})
        by_status: dict[str, list[Outcome]] = {}
        for o in batch:
            by_status.setdefault(o.status, []).append(o)
        policy = [o for o in batch if o.policy]
        # Permanent refusals during the transaction are bounce events (docs/bounces.md).
        refused = [send_event(o.blast_id, o.subscriber_id, o.code, o.error)
                   for o in batch if o.status == "failed" and o.code is not None]  # fmt: skip
        updates = delivery_updates(by_status, now, self._postgres)
        single = len(updates) == 1 and isinstance(updates[0][1], dict)  # not an executemany
        if single and self._single is not None and not (refused or policy):
            # The usual flush of a blast: one UPDATE of the sent rows. A single statement is
            # atomic by itself, so on PostgreSQL it runs without BEGIN and COMMIT: one round
            # trip instead of three (db.single_writes).
            statement, params = updates[0]
            dialect = self.runtime.engine.dialect
            if read is not None:  # it rides along (flush, _carries_read): one round trip
                assert statement is record_sql.SENT[True]
                driver = DriverStatement.cached(record_sql.sent_then(read[0]), dialect)
                values = {**cast(dict[str, Any], params), **read[1]}
                rows = await fetch(self.runtime.engine, driver, values)
            elif on_driver(self.runtime.engine):  # asyncpg runs it itself (driver_sql)
                driver = DriverStatement.cached(statement, dialect)
                await execute(self.runtime.engine, driver, cast(dict[str, Any], params))
            else:
                async with self._single.connect() as conn:
                    await conn.execute(statement, params)
        else:
            await self._write_in_transaction(updates, blasts, refused, policy, now)
        for status, kind in by_status.items():
            self._counts[status] += len(kind)
        self._blast_counts.update((o.blast_id, o.status) for o in batch)
        if sent := len(by_status.get(OutcomeStatus.sent, ())):
            self._sent_at[int(time.time())] += sent
        self._warn_failures(batch)
        return rows

    async def _write_in_transaction(
        self,
        updates: list[tuple[Update, dict[str, Any] | list[dict[str, Any]]]],
        blasts: list[int],
        refused: list[BounceEvent],
        policy: list[Outcome],
        now: datetime,
    ) -> None:
        """One transaction on a plain connection: at most one statement per outcome kind,
        whatever the number of rows (docs/recording.md). An ORM session joins the same
        transaction only for what needs one: bounce events and policy counts."""
        async with self.runtime.engine.begin() as conn:
            for statement, params in updates:
                await conn.execute(statement, params)
            if refused or policy:
                session = AsyncSession(bind=conn)
                try:
                    await self._refusals(session, blasts, refused, policy, now)
                    await session.flush()
                finally:
                    await session.close()  # leaves the connection's transaction alone

    async def _refusals(
        self,
        session: AsyncSession,
        blasts: list[int],
        refused: list[BounceEvent],
        policy: list[Outcome],
        now: datetime,
    ) -> None:
        """Bounce events and policy counts, in the flush's transaction; note the pauses."""
        applied = await apply_events(session, self.runtime.settings, refused, now)
        for event, result in zip(refused, applied, strict=True):
            if result.paused and event.blast_id is not None:
                self.paused[event.blast_id] = result.paused
        for blast_id in blasts:
            rejected = [o for o in policy if o.blast_id == blast_id]
            if rejected:
                last = rejected[-1]
                reason = await count_policy_failures(
                    session,
                    blast_id,
                    len(rejected),
                    (last.code, last.error),
                    self.runtime.settings.policy_failures_pause,
                )
                if reason is not None:
                    self.paused[blast_id] = reason

    async def _count_in_redis(self) -> None:
        """Process-independent counters, summed across every worker, for /metrics."""
        keys = self.runtime.keys
        self.counted_at = time.monotonic()
        counts, self._counts = self._counts, Counter()
        blast_counts, self._blast_counts = self._blast_counts, Counter()
        sent_at, self._sent_at = self._sent_at, Counter()
        async with self.runtime.redis.pipeline(transaction=False) as pipe:
            for status, n in counts.items():
                pipe.hincrby(keys.counters, f"messages_{status}", n)
            for (blast_id, status), n in blast_counts.items():
                pipe.hincrby(keys.blast_counters, f"{blast_id}:{status}", n)
            for second, n in sent_at.items():
                pipe.hincrby(keys.sent_log, str(second), n)
            self.stats.drain_into(pipe, keys)
            if pipe.command_stack:
                await pipe.execute()

    @staticmethod
    def _warn_failures(batch: list[Outcome]) -> None:
        """One line per blast, outcome and SMTP code in this flush, never one per message."""
        groups = Counter(
            (o.blast_id, o.status, o.code)
            for o in batch
            if o.status in (OutcomeStatus.failed, OutcomeStatus.retry)
        )
        for (blast_id, status, code), n in groups.items():
            log.warning(
                "blast %s: %s deliveries %s (SMTP code %s)",
                blast_id,
                n,
                "failed" if status == OutcomeStatus.failed else "deferred for a retry",
                code if code is not None else "none",
                extra={"blast_id": blast_id, "outcome": status, "count": n, "code": code},
            )


def delivery_updates(
    by_status: dict[str, list[Outcome]], now: datetime, postgres: bool
) -> list[tuple[Update, dict[str, Any] | list[dict[str, Any]]]]:
    """The flush's writes to ``deliveries``: one statement per outcome kind present.

    Sent and skipped rows share their values (one UPDATE … WHERE id IN); failed and retry
    rows each carry their own code, error and next attempt (one UPDATE by primary key,
    executed once with every row's parameters: an executemany, one round trip). The
    columns written per kind are exactly those of the row-at-a-time version before it.
    """
    out: list[tuple[Update, dict[str, Any] | list[dict[str, Any]]]] = []
    if rows := by_status.get(OutcomeStatus.sent):
        out.append(
            (record_sql.SENT[postgres], {"b_ids": [o.delivery_id for o in rows], "b_now": now})
        )
    if rows := by_status.get(OutcomeStatus.skipped):
        out.append((record_sql.SKIPPED[postgres], {"b_ids": [o.delivery_id for o in rows]}))
    if rows := by_status.get(OutcomeStatus.failed):
        params = [
            {"b_id": o.delivery_id, "b_tried": 0 if o.code is None else 1, **_last(o)} for o in rows
        ]
        out.append((record_sql.FAILED, params))
    if rows := by_status.get(OutcomeStatus.retry):
        params = [{"b_id": o.delivery_id, "b_next": o.next_attempt_at, **_last(o)} for o in rows]
        out.append((record_sql.RETRY, params))
    return out


def _last(o: Outcome) -> dict[str, Any]:
    return {"b_code": o.code, "b_error": (o.error or "")[:500]}
