"""The recorder (mailer/record.py): what one flush writes, row by row, in one transaction
(docs/recording.md); the bound on repeats is docs/design.md, invariant 2."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from helpers import seed_subscribers, sending_blast, sql, subscriber
from sqlalchemy import event, update

from mailer.config import Settings
from mailer.db import make_engine, utcnow
from mailer.models import Delivery, Subscriber, SubscriberStatus
from mailer.record import Outcome, Recorder
from mailer.runtime import Runtime
from mailer.stats import OutcomeStatus


async def test_a_mixed_flush_writes_each_rows_own_values_in_one_transaction(
    settings: Settings, redis: aioredis.Redis
) -> None:
    emails = (await seed_subscribers(settings, confirmed=9))["confirmed"]
    blast_id, deliveries = await sending_blast(settings, emails)
    runtime = Runtime.create(settings)
    # Earlier attempts left values behind: each kind must write exactly its own columns.
    async with runtime.engine.begin() as conn:
        await conn.execute(update(Delivery).values(attempts=2, last_code=421, last_error="x"))
    sent1, sent2, skipped, unsendable, hard, policy, retry1, retry2, long = emails
    later = utcnow().replace(microsecond=0) + timedelta(minutes=7)
    outcomes = [
        (sent1, OutcomeStatus.sent, None, None, {}),
        (sent2, OutcomeStatus.sent, None, None, {}),
        (skipped, OutcomeStatus.skipped, None, None, {}),
        (unsendable, OutcomeStatus.failed, None, "address cannot be put on the wire", {}),
        (hard, OutcomeStatus.failed, 550, "5.1.1 user unknown", {"suppress": True}),
        (policy, OutcomeStatus.failed, 554, "5.7.1 rejected by policy", {"policy": True}),
        (retry1, OutcomeStatus.retry, 451, "4.7.1 greylisted", {"next_attempt_at": later}),
        (retry2, OutcomeStatus.retry, None, "connection lost",
         {"next_attempt_at": later + timedelta(seconds=1)}),
        (long, OutcomeStatus.retry, 452, "4" * 900, {"next_attempt_at": later}),
    ]  # fmt: skip
    ids = await sql(settings, "SELECT email, id FROM subscribers")
    subscriber_of = {email: int(i) for email, i in ids}
    writes: list[str] = []
    event.listen(
        runtime.engine.sync_engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *args: writes.append(" ".join(statement.split()[:2])),
    )
    event.listen(runtime.engine.sync_engine, "commit", lambda conn: writes.append("COMMIT"))
    try:
        recorder = Recorder(runtime)
        recorder.buffer = [
            Outcome(blast_id, deliveries[email], subscriber_of[email], status, code, error, **kw)
            for email, status, code, error, kw in outcomes
        ]
        before = utcnow()
        await recorder.flush(final=True)  # as at the end of a chunk: the counters too
        assert writes.count("COMMIT") == 1  # the whole flush, bounce events included
        assert writes.count("UPDATE deliveries") == 4  # one per kind, not one per row
        rows = {
            int(r[0]): r[1:]
            for r in await sql(
                settings,
                "SELECT id, status, attempts, last_code, last_error, lease_until, sent_at "
                "FROM deliveries",
            )
        }
        row = {email: rows[deliveries[email]] for email in emails}
        for email in (sent1, sent2):
            status, attempts, code, error, lease, sent_at = row[email]
            assert (status, attempts, code, error, lease) == ("sent", 3, 421, "x", None)
            assert sent_at is not None
        assert row[skipped] == ("skipped", 2, 421, "x", None, None)
        assert row[unsendable] == (
            "failed", 2, None, "address cannot be put on the wire", None, None
        )  # fmt: skip
        assert row[hard] == ("failed", 3, 550, "5.1.1 user unknown", None, None)
        assert row[policy] == ("failed", 3, 554, "5.7.1 rejected by policy", None, None)
        assert row[retry1] == ("pending", 3, 451, "4.7.1 greylisted", None, None)
        assert row[retry2] == ("pending", 3, None, "connection lost", None, None)
        assert row[long] == ("pending", 3, 452, "4" * 500, None, None)
        due = {
            int(r[0]): r[1]
            for r in await sql(settings, "SELECT id, next_attempt_at FROM deliveries")
        }
        assert _utc(due[deliveries[retry1]]) == later
        assert _utc(due[deliveries[retry2]]) == later + timedelta(seconds=1)
        assert all(due[deliveries[e]] is None for e in (sent1, skipped, unsendable, hard))
        # The hard refusal is a bounce event and bounces its subscriber; the policy
        # refusal is an event and a count on the blast, and leaves its subscriber alone.
        stored = await sql(settings, "SELECT subscriber_id, kind, code FROM bounce_events")
        assert sorted(stored) == sorted(
            [(subscriber_of[hard], "hard", 550), (subscriber_of[policy], "policy", 554)]
        )
        bounced = await subscriber(settings, hard)
        assert bounced is not None and bounced.status == "bounced"
        assert bounced.bounced_at is not None and _utc(bounced.bounced_at) >= before
        kept = await subscriber(settings, policy)
        assert kept is not None and kept.status == "confirmed"
        assert await sql(settings, "SELECT policy_failures, status FROM blasts") == [(1, "sending")]
        counters = await redis.hgetall(runtime.keys.counters)  # type: ignore[misc]
        assert {k.decode(): int(v) for k, v in counters.items()} == {
            "messages_sent": 2,
            "messages_skipped": 1,
            "messages_failed": 3,
            "messages_retry": 3,
        }
        assert recorder.paused == {}
    finally:
        await runtime.close()


async def test_policy_counts_pause_the_blast_in_the_flush_that_reaches_the_limit(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"policy_failures_pause": 3})
    emails = (await seed_subscribers(settings, confirmed=4))["confirmed"]
    blast_id, deliveries = await sending_blast(settings, emails)
    ids = {email: int(i) for email, i in await sql(settings, "SELECT email, id FROM subscribers")}
    runtime = Runtime.create(settings)

    def refused(email: str) -> Outcome:
        return Outcome(
            blast_id, deliveries[email], ids[email], OutcomeStatus.failed, 554, "5.7.1 spam",
            policy=True,
        )  # fmt: skip

    try:
        recorder = Recorder(runtime)
        recorder.buffer = [refused(e) for e in emails[:2]]
        await recorder.flush()
        assert recorder.paused == {}
        assert await sql(settings, "SELECT policy_failures, status FROM blasts") == [(2, "sending")]
        recorder.buffer = [refused(e) for e in emails[2:]]
        await recorder.flush()
        assert "after 4 policy rejections" in recorder.paused[blast_id]
        ((failures, status, reason),) = await sql(
            settings, "SELECT policy_failures, status, reason FROM blasts"
        )
        assert (failures, status) == (4, "paused") and "5.7.1 spam" in reason
    finally:
        await runtime.close()


async def test_counters_trail_the_flushes_and_the_last_flush_of_a_chunk_writes_them(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis counters are written at most every COUNTERS_SECONDS, not by every flush; what
    the flushes in between counted is summed, and the flush that ends a chunk writes it."""
    from mailer import record

    monkeypatch.setattr(record, "COUNTERS_SECONDS", 3600.0)  # no flush here is due for it
    emails = (await seed_subscribers(settings, confirmed=5))["confirmed"]
    blast_id, deliveries = await sending_blast(settings, emails)
    ids = {email: int(i) for email, i in await sql(settings, "SELECT email, id FROM subscribers")}
    runtime = Runtime.create(settings)
    redis = runtime.redis

    def sent(email: str) -> Outcome:
        return Outcome(blast_id, deliveries[email], ids[email], OutcomeStatus.sent)

    try:
        recorder = Recorder(runtime)
        for email in emails[:3]:
            recorder.buffer = [sent(email)]
            await recorder.flush()
        assert await sql(settings, "SELECT count(*) FROM deliveries WHERE status = 'sent'") == [
            (3,)
        ]
        assert await redis.hgetall(runtime.keys.counters) == {}  # type: ignore[misc]
        recorder.buffer = [sent(e) for e in emails[3:]]
        await recorder.flush(final=True)
        counters = await redis.hgetall(runtime.keys.counters)  # type: ignore[misc]
        assert {k.decode(): int(v) for k, v in counters.items()} == {"messages_sent": 5}
        by_blast = await redis.hgetall(runtime.keys.blast_counters)  # type: ignore[misc]
        assert by_blast == {f"{blast_id}:sent".encode(): b"5"}
        per_second = await redis.hgetall(runtime.keys.sent_log)  # type: ignore[misc]
        assert sum(int(v) for v in per_second.values()) == 5
    finally:
        await runtime.close()


def _utc(value: Any) -> Any:
    """A timestamp read back with plain SQL: SQLite gives a naive string, PostgreSQL an
    aware datetime."""
    from datetime import UTC, datetime

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def test_lanes_waiting_for_places_are_let_through_one_after_another(
    settings: Settings,
) -> None:
    """A change wakes one waiting lane; each lane that gets its places hands the turn on,
    so room for several lets several through, and nobody is left waiting for a change
    that already happened. A lane cancelled on its turn passes it on."""
    runtime = Runtime.create(settings)
    try:
        recorder = Recorder(runtime)
        await recorder.reserve(20)  # every place taken by sends under way
        waiting = [asyncio.create_task(recorder.reserve(5)) for _ in range(4)]
        await asyncio.sleep(0)
        assert not any(t.done() for t in waiting)
        recorder.unreserve(20)  # those sends ended: room for exactly four lanes of five
        waiting[0].cancel()  # woken first, but cancelled before it could look
        with pytest.raises(asyncio.CancelledError):
            await waiting[0]
        await asyncio.wait_for(asyncio.gather(*waiting[1:]), 10)  # no timer involved
        last = asyncio.create_task(recorder.reserve(5))  # the fourth place of five
        await asyncio.wait_for(last, 10)
        full = asyncio.create_task(recorder.reserve(1))  # and now none is left
        await asyncio.sleep(0)
        assert not full.done()
        recorder.unreserve(1)
        await asyncio.wait_for(full, 10)
    finally:
        await runtime.close()


async def test_a_reserve_that_must_flush_reads_the_recheck_in_the_flushs_statement(
    settings: Settings,
) -> None:
    """When the places a send waits for come from a flush, the send's re-check rides in the
    flush's round trip on PostgreSQL: one statement writes the sent rows and reads who is
    still subscribed, seeing an unsubscribe committed before it (docs/design.md,
    invariant 3). The places are taken as the flush begins, so no lane that comes meanwhile
    takes them. Without a flush, or on SQLite, the caller reads for itself (None)."""
    from mailer.delivery.sender import _STILL_SUBSCRIBED

    postgres = settings.database_url.startswith("postgresql")
    emails = (await seed_subscribers(settings, confirmed=18))["confirmed"]
    blast_id, deliveries = await sending_blast(settings, emails)
    ids = {email: int(i) for email, i in await sql(settings, "SELECT email, id FROM subscribers")}
    left = emails[17]
    engine = make_engine(settings.database_url)
    async with engine.begin() as conn:  # committed before the read: it must see it
        gone = update(Subscriber).where(Subscriber.id == ids[left])
        await conn.execute(gone.values(status=SubscriberStatus.unsubscribed))
    await engine.dispose()
    runtime = Runtime.create(settings)
    queries: list[str] = []

    @event.listens_for(runtime.engine.sync_engine, "connect")
    def log_queries(dbapi_connection: Any, record: Any) -> None:
        if postgres:
            dbapi_connection.driver_connection.add_query_logger(lambda q: queries.append(q.query))

    read = (_STILL_SUBSCRIBED[postgres], {"ids": [ids[emails[16]], ids[left]]})
    try:
        recorder = Recorder(runtime)
        recorder.buffer = [
            Outcome(blast_id, deliveries[e], ids[e], OutcomeStatus.sent) for e in emails[:16]
        ]
        # 16 + 5 > 20: a flush makes room; on PostgreSQL a lane coming meanwhile finds it
        # taken (on SQLite it may take it first: the flush's lane then reads for itself).
        first = asyncio.create_task(recorder.reserve(5, read=read))
        other = asyncio.create_task(recorder.reserve(16)) if postgres else None
        rows = await first
        written = "SELECT count(*) FROM deliveries WHERE status = 'sent'"
        assert await sql(settings, written) == [(16,)]
        if postgres:
            assert rows is not None and {r[0]: r[1] for r in rows} == {ids[emails[16]]: emails[16]}
            ours = [q for q in queries if "deliveries" in q or "subscribers" in q]  # no set-up
            assert [" ".join(q.split()[:5]) for q in ours] == ["WITH flushed AS (UPDATE deliveries"]
        else:
            assert rows is None
        if other is not None:
            await asyncio.sleep(0.05)
            assert not other.done()  # 5 + 16 > 20
            recorder.unreserve(5)
            await asyncio.wait_for(other, 10)
        assert await recorder.reserve(2, read=read) is None  # room without a flush
    finally:
        await runtime.close()
