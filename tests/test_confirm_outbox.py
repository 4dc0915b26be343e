"""Confirmation mails are SQL truth (docs/design.md, invariant 1; docs/security.md): a
flushed Redis, a process that died between the INSERT and the enqueue, and a policy
refusal all end with exactly one confirmation mail per person.

The worker runs in arq's burst mode and the reconciler is called once, so "within two
reconciler intervals" is checked as "after one reconciler pass", without sleeping.
"""

from __future__ import annotations

import csv
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from burst import reconcile_once, run_burst
from helpers import clean_redis, events, sql, subscriber, wait_until
from smtpserver import SmtpServer

from mailer.config import Settings
from mailer.db import make_engine, make_sessionmaker, utcnow
from mailer.importer import ImportOptions, import_csv
from mailer.migrate import upgrade
from mailer.models import Subscriber, SubscriberEvent
from mailer.queue import Queue
from mailer.subscriptions import Origin, subscribe


async def queued(redis: aioredis.Redis, settings: Settings) -> int:
    return int(await redis.zcard(settings.queue_name))


async def owed(settings: Settings) -> int:
    rows = await sql(settings, "SELECT count(*) FROM subscribers WHERE confirm_due_at IS NOT NULL")
    return int(rows[0][0])


async def test_thirty_sign_ups_survive_a_flushed_redis(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer, redis: aioredis.Redis
) -> None:
    people = [f"reader{i:02d}@example.com" for i in range(30)]
    for email in people:  # no worker runs
        assert (await app_client.post("/subscribe", json={"email": email})).status_code == 202
    assert await owed(settings) == 30 and await queued(redis, settings) == 30
    await reconcile_once(settings)  # every job is alive: nothing is queued twice
    assert await queued(redis, settings) == 30

    await clean_redis(redis, settings.queue_name)  # Redis lost everything of this queue
    assert await queued(redis, settings) == 0
    await reconcile_once(settings)
    assert await queued(redis, settings) == 30
    await run_burst(settings)
    assert smtp.recorder.counts() == {email: 1 for email in people}

    # Later passes find nothing owed: still exactly one mail each.
    await reconcile_once(settings)
    await run_burst(settings)
    assert smtp.recorder.counts() == {email: 1 for email in people}
    rows = await sql(
        settings, "SELECT count(*) FROM subscribers WHERE confirm_due_at IS NULL "
        "AND confirm_sent_at IS NOT NULL AND status = 'pending'",
    )  # fmt: skip
    assert rows[0][0] == 30


async def test_a_sign_up_whose_process_died_before_the_enqueue_is_mailed_once(
    settings: Settings, smtp: SmtpServer, redis: aioredis.Redis, start_worker: Any
) -> None:
    # The web process committed the sign-up and died before it queued the job.
    engine = make_engine(settings.database_url)
    try:
        due = await subscribe(engine, "late@example.com", None, Origin(), resend_after_s=3600)
    finally:
        await engine.dispose()
    assert due is not None and await queued(redis, settings) == 0
    # The worker's own reconciler cron (every second here) finds it.
    await start_worker()
    await wait_until(lambda: smtp.recorder.to("late@example.com"), timeout=30)
    await reconcile_once(settings)
    await run_burst(settings)
    assert len(smtp.recorder.to("late@example.com")) == 1
    sub = await subscriber(settings, "late@example.com")
    assert sub is not None and sub.confirm_due_at is None and sub.confirm_sent_at is not None


async def test_two_jobs_for_one_row_send_one_mail(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer
) -> None:
    """The claim in SQL, not the job id, decides who sends: stray copies send nothing."""
    assert (await app_client.post("/subscribe", json={"email": "twice@example.com"})).status_code
    sub = await subscriber(settings, "twice@example.com")
    assert sub is not None
    queue = await Queue.connect(settings)
    try:
        await queue.confirmations([(sub.id, f"{settings.queue_name}:stray:{n}") for n in range(3)])
    finally:
        await queue.close()
    worker = await run_burst(settings)
    assert len(smtp.recorder.to("twice@example.com")) == 1
    assert worker.jobs_complete == 4 and worker.jobs_failed == 0


@pytest.mark.parametrize("settings_overrides", [{"retry_base_s": 1.0}])
async def test_a_policy_refusal_is_tried_again_with_backoff(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer, redis: aioredis.Redis
) -> None:
    smtp.recorder.plan = lambda rcpt, attempt: "550 5.7.1 sender blocked" if attempt <= 2 else None
    assert (await app_client.post("/subscribe", json={"email": "held@example.com"})).status_code
    await run_burst(settings, max_burst_jobs=1)  # the first try: refused by policy
    sub = await subscriber(settings, "held@example.com")
    assert sub is not None and sub.confirm_attempts == 1 and sub.confirm_due_at is not None
    assert sub.confirm_due_at > utcnow()  # owed again, after the backoff
    assert smtp.recorder.to("held@example.com") == []

    # Even when Redis loses the queued retry, the row still says the mail is owed.
    await clean_redis(redis, settings.queue_name)
    await wait_until(lambda: _due_now(settings, "held@example.com"), timeout=10)
    await reconcile_once(settings)
    await run_burst(settings)  # the second try is refused again, the third goes out
    assert len(smtp.recorder.to("held@example.com")) == 1
    assert smtp.recorder.attempts["held@example.com"] == 3
    sub = await subscriber(settings, "held@example.com")
    assert sub is not None and sub.status == "pending"  # a policy refusal is not a bounce
    assert (sub.confirm_due_at, sub.confirm_attempts) == (None, 0)
    kinds = [e.kind for e in await events(settings, sub.id)]
    assert kinds == ["signup", "confirmation_sent"]


async def _due_now(settings: Settings, email: str) -> bool:
    sub = await subscriber(settings, email)
    return sub is not None and sub.confirm_due_at is not None and sub.confirm_due_at <= utcnow()


@pytest.mark.parametrize("settings_overrides", [{"retry_max_age_s": 1}])
async def test_a_mail_that_keeps_failing_is_given_up_and_recorded(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer
) -> None:
    smtp.recorder.plan = lambda rcpt, attempt: "451 4.3.0 try later"
    assert (await app_client.post("/subscribe", json={"email": "never@example.com"})).status_code
    await run_burst(settings)  # backoff 0.05 s doubling: 0.05 + 0.1 + 0.2 + 0.4 + 0.8 >= 1 s
    assert smtp.recorder.attempts["never@example.com"] == 5
    sub = await subscriber(settings, "never@example.com")
    assert sub is not None and sub.confirm_due_at is None
    failed = [e for e in await events(settings, sub.id) if e.kind == "confirmation_failed"]
    assert len(failed) == 1 and "given up after 5 tries" in (failed[0].detail or "")
    await reconcile_once(settings)  # given up means given up
    assert (await run_burst(settings)).jobs_complete == 0


async def test_an_import_without_confirmed_survives_a_flushed_redis(
    settings: Settings, smtp: SmtpServer, redis: aioredis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "list.csv"
    people = [f"member{i}@example.net" for i in range(20)]
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([["email"], *[[e] for e in people]])
    report = await import_csv(settings, path, ImportOptions())
    assert report.queued == 20 and await queued(redis, settings) == 20
    await clean_redis(redis, settings.queue_name)
    await reconcile_once(settings)
    await run_burst(settings)
    assert smtp.recorder.counts() == {email: 1 for email in people}


async def test_migration_owes_the_mails_the_old_code_claimed_but_never_sent(
    empty_db_url: str,
) -> None:
    engine = make_engine(empty_db_url)
    try:
        await upgrade(engine, "0005")
        now = utcnow()
        rows = {  # email: (status, claimed, sent event)
            "lost@example.com": ("pending", now - timedelta(hours=1), None),
            "sent@example.com": ("pending", now - timedelta(hours=1), now),
            "old@example.com": ("pending", now - timedelta(days=8), None),
            "done@example.com": ("confirmed", now - timedelta(hours=1), None),
        }
        async with engine.begin() as conn:
            for email, (status, claimed, sent) in rows.items():
                sid = (
                    await conn.execute(
                        Subscriber.__table__.insert()
                        .values(
                            email=email, status=status, created_at=now, updated_at=now,
                            confirm_sent_at=claimed,
                        )
                        .returning(Subscriber.__table__.c.id)
                    )
                ).scalar_one()  # fmt: skip
                if sent is not None:
                    await conn.execute(
                        SubscriberEvent.__table__.insert().values(
                            subscriber_id=sid, kind="confirmation_sent", at=sent
                        )
                    )
        await upgrade(engine)
        async with make_sessionmaker(engine)() as session:
            result = await session.execute(
                Subscriber.__table__.select().with_only_columns(
                    Subscriber.email, Subscriber.confirm_due_at, Subscriber.confirm_attempts
                )
            )
            got = {email: (due is not None, tries) for email, due, tries in result}
        assert got == {
            "lost@example.com": (True, 0),
            "sent@example.com": (False, 0),
            "old@example.com": (False, 0),
            "done@example.com": (False, 0),
        }
    finally:
        await engine.dispose()
