"""What bounce events do: the soft-bounce window with the clock moved, idempotency, the
auto-pause at both thresholds, SMTP-time refusals in the same pipeline, provider events,
and the figures on /metrics."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from bounce_reports import arf, postfix_dsn
from helpers import (
    auth,
    blast,
    editor_token,
    progress,
    publish,
    scrape,
    seed_subscribers,
    sql,
    subscriber,
    subscriber_ids,
    value,
    wait_status,
)
from rich.console import Console
from smtpserver import SmtpServer

from mailer.bounces import BounceEvent, BounceKind, apply_event, ingest
from mailer.bounces.stats import for_blast
from mailer.config import Settings
from mailer.db import utcnow
from mailer.models import Blast, Delivery
from mailer.ops import status
from mailer.queue import Queue
from mailer.render import make_message_id
from mailer.runtime import Runtime

VERP = {"verp_domain": "bounce.test"}
T0 = datetime(2030, 1, 1, 12, tzinfo=UTC)


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    rt = Runtime.create(settings)
    yield rt
    await rt.close()


def sent(rt: Runtime, sub_id: int, blast_id: int, email: str) -> tuple[bytes, str]:
    """The headers of the message a blast sent ``sub_id``, and its VERP return path."""
    message_id = make_message_id(rt.settings, blast_id, sub_id)
    original = (
        f"From: Campaign updates <updates@example.org>\r\nTo: {email}\r\n"
        f"Subject: A statement\r\nMessage-ID: {message_id}\r\n"
        f"List-Unsubscribe: <{rt.unsubscribe_url(sub_id)}>\r\n\r\nHello\r\n"
    ).encode()
    return original, f"bounces+{rt.tokens.bounce_tag(sub_id, blast_id)}@bounce.test"


async def soft(rt: Runtime, sub_id: int, email: str, blast_id: int, at: datetime) -> str:
    original, envelope = sent(rt, sub_id, blast_id, email)
    raw = postfix_dsn(
        original, email, envelope, status="4.2.2", action="delayed",
        diagnostic=f"smtp; 452 4.2.2 <{email}>: Mailbox full",
    )  # fmt: skip
    return (await ingest(rt, raw, source="cli", envelope_to=envelope, now=at)).summary


@pytest.mark.parametrize("settings_overrides", [VERP])
async def test_soft_bounces_count_within_the_window_and_decay(
    settings: Settings, runtime: Runtime
) -> None:
    email = (await seed_subscribers(settings, confirmed=1))["confirmed"][0]
    sub_id = (await subscriber_ids(settings, [email]))[email]
    assert "soft bounce 1 of 3" in await soft(runtime, sub_id, email, 1, T0)
    assert "soft bounce 2 of 3" in await soft(runtime, sub_id, email, 2, T0 + timedelta(days=10))
    # A second "still delayed" notice about the same message counts once.
    later = T0 + timedelta(days=10, hours=4)
    assert "soft bounce 2 of 3" in await soft(runtime, sub_id, email, 2, later)
    # Day 20: the first one decayed out of the 14-day window.
    assert "soft bounce 2 of 3" in await soft(runtime, sub_id, email, 3, T0 + timedelta(days=20))
    assert (await subscriber(settings, email)).status == "confirmed"  # type: ignore[union-attr]
    line = await soft(runtime, sub_id, email, 4, T0 + timedelta(days=21))
    assert "bounced (3 soft in 14 days)" in line
    sub = await subscriber(settings, email)
    assert sub is not None and sub.status == "bounced" and sub.bounced_at == T0 + timedelta(days=21)
    query = "SELECT detail FROM subscriber_events WHERE kind = 'bounced' AND subscriber_id = :i"
    detail = await sql(settings, query, i=sub_id)
    assert detail[0][0].startswith("3 soft bounces within 14 days")


@pytest.mark.parametrize("settings_overrides", [VERP])
async def test_the_same_report_twice_counts_once(settings: Settings, runtime: Runtime) -> None:
    email = (await seed_subscribers(settings, confirmed=1))["confirmed"][0]
    sub_id = (await subscriber_ids(settings, [email]))[email]
    original, envelope = sent(runtime, sub_id, 9, email)
    raw = postfix_dsn(original, email, envelope, status="4.2.2", action="delayed",
                      diagnostic="smtp; 452 4.2.2 Mailbox full")  # fmt: skip
    first = await ingest(runtime, raw, source="smtp", envelope_to=envelope, now=T0)
    assert first.kind is BounceKind.soft and not first.duplicate
    # Relayed again: another Received line on top, piped with LF instead of CRLF.
    relayed = b"Received: from relay2.example.net; Wed, 27 Nov 2024 10:05:00 +0000\n"
    relayed += raw.replace(b"\r\n", b"\n")
    again = await ingest(runtime, relayed, source="cli", envelope_to=envelope, now=T0)
    both = await asyncio.gather(
        *(ingest(runtime, raw, source="cli", envelope_to=envelope, now=T0) for _ in range(3))
    )
    assert again.duplicate and all(r.duplicate for r in both)
    assert again.summary.startswith("duplicate DSN")
    assert await sql(settings, "SELECT count(*) FROM bounce_events") == [(1,)]
    assert "1 of 3" in first.summary


async def sending_blast(
    settings: Settings, client: httpx.AsyncClient, token: str, n: int, prefix: str
) -> tuple[int, list[tuple[int, str]]]:
    """A blast in the middle of sending: ``n`` deliveries already sent (rows written directly)."""
    people = (await seed_subscribers(settings, confirmed=n, prefix=prefix))["confirmed"]
    ids = await subscriber_ids(settings, people)
    statement = await publish(client, token, title=f"Blast {prefix}")
    now = utcnow()
    rt = Runtime.create(settings)
    try:
        async with rt.sessions() as session:
            row = Blast(statement_id=statement, status="sending", total=n, started_at=now)
            session.add(row)
            await session.flush()
            session.add_all(
                Delivery(blast_id=row.id, subscriber_id=ids[e], status="sent", sent_at=now)
                for e in people
            )
            await session.commit()
            return row.id, [(ids[e], e) for e in people]
    finally:
        await rt.close()


@pytest.mark.parametrize("settings_overrides", [VERP])
async def test_a_blast_pauses_itself_at_the_bounce_and_complaint_rates(
    settings: Settings, runtime: Runtime, app_client: httpx.AsyncClient
) -> None:
    token = await editor_token(settings)

    async def hard(blast_id: int, sub_id: int, email: str) -> str:
        original, envelope = sent(runtime, sub_id, blast_id, email)
        raw = postfix_dsn(original, email, envelope)
        return (await ingest(runtime, raw, source="cli", envelope_to=envelope)).summary

    async def complaint(blast_id: int, sub_id: int, email: str) -> str:
        original, _ = sent(runtime, sub_id, blast_id, email)
        raw = arf(original)
        return (
            await ingest(runtime, raw, source="smtp", envelope_to="complaints@bounce.test")
        ).summary

    # Hard bounces: 5 % of 600 is 30; the 31st passes the rate.
    bounced, people = await sending_blast(settings, app_client, token, 600, "h")
    for sub_id, email in people[:30]:
        await hard(bounced, sub_id, email)
    assert (await progress(app_client, token, bounced))["status"] == "sending"
    line = await hard(bounced, *people[30])
    p = await progress(app_client, token, bounced)
    assert p["status"] == "paused", p
    assert p["reason"].startswith("paused automatically: hard-bounce rate 5.2% (31 of 600 sent)")
    assert "MAILER_BOUNCE_PAUSE_RATE 5.0%" in p["reason"] and p["reason"] in line
    async with runtime.reads() as session:
        figures = await for_blast(session, bounced)
    assert (figures.hard, figures.attempted, figures.complaints) == (31, 600, 0)
    assert round(figures.hard_rate, 4) == round(31 / 600, 4)
    assert "31 (5.2%)" in await status_row(settings, runtime, bounced)  # `mailer status`
    # An editor who resumes has read the reason: the next bounce does not pause it again.
    r = await app_client.post(f"/api/blasts/{bounced}/resume", headers=auth(token))
    assert r.status_code == 200 and r.json()["reason"] is None
    await hard(bounced, *people[31])
    assert (await progress(app_client, token, bounced))["status"] == "sending"

    # Complaints: 0.3 % of 600 is 1.8; the second complaint passes it.
    complained, people = await sending_blast(settings, app_client, token, 600, "c")
    await complaint(complained, *people[0])
    assert (await progress(app_client, token, complained))["status"] == "sending"
    await complaint(complained, *people[1])
    p = await progress(app_client, token, complained)
    assert p["status"] == "paused"
    assert p["reason"].startswith("paused automatically: complaint rate 0.3% (2 of 600 sent)")
    assert "MAILER_COMPLAINT_PAUSE_RATE" in p["reason"]

    # Below MAILER_BOUNCE_PAUSE_MIN_SENT (500) no rate pauses a blast: 20 % of 100 is noise.
    small, people = await sending_blast(settings, app_client, token, 100, "s")
    for sub_id, email in people[:20]:
        await hard(small, sub_id, email)
    await complaint(small, *people[20])
    assert (await progress(app_client, token, small))["status"] == "sending"
    paused = await sql(settings, "SELECT blast_id, kind FROM bounce_events WHERE paused_blast")
    assert sorted(paused) == sorted([(bounced, "hard"), (complained, "complaint")])


async def status_row(settings: Settings, rt: Runtime, blast_id: int) -> str:
    """The blast's row in ``mailer status``, rendered as a terminal would show it."""
    queue = await Queue.connect(settings)
    try:
        shown = await status.collect(rt, queue)
    finally:
        await queue.close()
    console = Console(file=io.StringIO(), width=250, color_system=None)
    console.print(status.render(shown))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return next(line for line in text.splitlines() if line.strip("│┃ ").startswith(str(blast_id)))


def refusals(rcpt: str, attempt: int) -> str | None:
    if rcpt.startswith("conf000000"):
        return f"550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown"
    if rcpt.startswith("conf000001"):
        return "552 5.2.2 Mailbox full"
    if rcpt.startswith("conf000002"):
        return "554 5.7.1 Service unavailable; client host blocked using zen.spamhaus.org"
    return None


@pytest.mark.parametrize("settings_overrides", [VERP])
async def test_refusals_during_the_transaction_are_the_same_events_as_dsns(
    settings: Settings,
    runtime: Runtime,
    app_client: httpx.AsyncClient,
    smtp: SmtpServer,
    start_worker: Any,
) -> None:
    a = sorted((await seed_subscribers(settings, confirmed=4))["confirmed"])
    ids = await subscriber_ids(settings, a)
    token = await editor_token(settings)
    smtp.recorder.plan = refusals
    await start_worker()
    bid = await blast(app_client, token, await publish(app_client, token))
    done = await wait_status(app_client, token, bid, "done")
    assert (done["sent"], done["failed"]) == (1, 3)
    rows = await sql(
        settings,
        "SELECT subscriber_id, kind, source, code, status, blast_id FROM bounce_events"
        " ORDER BY subscriber_id",
    )
    assert rows == [
        (ids[a[0]], "hard", "send", 550, "5.1.1", bid),
        (ids[a[1]], "soft", "send", 552, "5.2.2", bid),
        (ids[a[2]], "policy", "send", 554, "5.7.1", bid),
    ]
    statuses = [(await subscriber(settings, e)).status for e in a]  # type: ignore[union-attr]
    assert statuses == ["bounced", "confirmed", "confirmed", "confirmed"]
    # A DSN saying 5.1.1 about the one delivered message: the same kind of event.
    got = smtp.recorder.to(a[3])[0]
    dsn = await ingest(
        runtime, postfix_dsn(got.data, a[3], got.mail_from), source="cli", envelope_to=got.mail_from
    )
    assert dsn.kind is BounceKind.hard and dsn.blast_id == bid
    assert (await subscriber(settings, a[3])).status == "bounced"  # type: ignore[union-attr]


@pytest.mark.parametrize("settings_overrides", [VERP])
async def test_provider_events_and_the_metrics(
    settings: Settings, runtime: Runtime, app_client: httpx.AsyncClient
) -> None:
    a = sorted((await seed_subscribers(settings, confirmed=3))["confirmed"])
    verified = BounceEvent(
        kind=BounceKind.complaint,
        source="webhook:postmark",
        fingerprint="webhook:postmark:abc-1",
        report="webhook",
        email=a[0].upper(),
        evidence="provider",
    )
    first = await apply_event(runtime, verified)
    assert first.subscriber_id is not None and "unsubscribed" in first.summary
    assert (await apply_event(runtime, verified)).duplicate
    # The same claim without a verified provider behind it changes nothing.
    claim = BounceEvent(
        kind=BounceKind.hard,
        source="webhook:postmark",
        fingerprint="webhook:postmark:abc-2",
        email=a[1],
    )
    unverified = await apply_event(runtime, claim)
    assert unverified.kind is BounceKind.unmatched and "nothing changed" in unverified.summary
    hard = BounceEvent(
        kind=BounceKind.hard,
        source="webhook:ses",
        fingerprint="webhook:ses:x-3",
        email=a[2],
        evidence="provider",
        status="5.1.1",
    )
    assert "bounced" in (await apply_event(runtime, hard)).summary
    statuses = [(await subscriber(settings, e)).status for e in a]  # type: ignore[union-attr]
    assert statuses == ["unsubscribed", "confirmed", "bounced"]

    figures = await scrape(app_client)
    assert value(figures, "mailer_bounces_total", kind="complaint") == 1
    assert value(figures, "mailer_bounces_total", kind="hard") == 1
    assert value(figures, "mailer_bounces_total", kind="unmatched") == 1
    assert value(figures, "mailer_bounces_total", kind="soft") == 0
    assert value(figures, "mailer_complaints_total") == 1


@pytest.mark.parametrize("settings_overrides", [VERP])
async def test_the_message_id_alone_identifies_and_an_address_alone_does_not(
    settings: Settings, runtime: Runtime
) -> None:
    a = sorted((await seed_subscribers(settings, confirmed=3))["confirmed"])
    ids = await subscriber_ids(settings, a)

    def without_unsubscribe(original: bytes) -> bytes:
        lines = original.split(b"\r\n")
        return b"\r\n".join(ln for ln in lines if not ln.lower().startswith(b"list-unsubscribe"))

    # A feedback loop that kept To and the HMAC Message-ID: the address is only a candidate,
    # the Message-ID's HMAC proves subscriber and blast.
    original, _ = sent(runtime, ids[a[0]], 77, a[0])
    report = arf(without_unsubscribe(original), redact_to=False)
    done = await ingest(runtime, report, source="smtp", envelope_to="complaints@bounce.test")
    assert (done.kind, done.subscriber_id, done.blast_id) == (BounceKind.complaint, ids[a[0]], 77)
    assert "(by message-id)" in done.summary
    # The same Message-ID with another subscriber's address in To: the HMAC says no.
    original, _ = sent(runtime, ids[a[1]], 77, a[1])
    swapped = without_unsubscribe(original).replace(a[1].encode(), a[2].encode())
    done = await ingest(runtime, arf(swapped, redact_to=False), source="smtp", envelope_to=None)
    assert done.kind is BounceKind.unmatched and done.subscriber_id is None
    # Only an address (a DSN to the complaints address naming a subscriber): unmatched.
    plain = f"From: x@example.net\r\nTo: {a[2]}\r\nSubject: hi\r\n\r\nhi\r\n".encode()
    dsn = postfix_dsn(plain, a[2], "complaints@bounce.test", whole_message=False)
    done = await ingest(runtime, dsn, source="smtp", envelope_to="complaints@bounce.test")
    assert done.kind is BounceKind.unmatched and "would be hard" in done.summary
    statuses = [(await subscriber(settings, e)).status for e in a]  # type: ignore[union-attr]
    assert statuses == ["unsubscribed", "confirmed", "confirmed"]


@pytest.mark.parametrize("settings_overrides", [VERP])
async def test_export_shows_bounces_and_erase_scrubs_them(
    settings: Settings, runtime: Runtime, app_client: httpx.AsyncClient
) -> None:
    email = (await seed_subscribers(settings, confirmed=1))["confirmed"][0]
    sub_id = (await subscriber_ids(settings, [email]))[email]
    original, envelope = sent(runtime, sub_id, 5, email)
    await ingest(
        runtime, postfix_dsn(original, email, envelope), source="cli", envelope_to=envelope
    )
    # A forged report quoting the address (in other case) is stored unmatched, and scrubbed too.
    forged = postfix_dsn(b"Subject: x\r\n\r\n", email.upper(), "complaints@bounce.test")
    await ingest(runtime, forged, source="cli", envelope_to="complaints@bounce.test")
    token = await editor_token(settings)
    r = await app_client.get(f"/api/subscribers/{sub_id}/export", headers=auth(token))
    assert [(b["kind"], b["blast_id"], b["status"]) for b in r.json()["bounces"]] == [
        ("hard", 5, "5.1.1")
    ]
    assert email in r.json()["bounces"][0]["diagnostic"]
    r = await app_client.delete(f"/api/subscribers/{sub_id}", headers=auth(token))
    assert r.status_code == 204
    rows = await sql(settings, "SELECT subscriber_id, diagnostic, note, kind FROM bounce_events")
    assert [r[3] for r in rows] == ["hard", "unmatched"]  # the counts stay
    assert all(r[0] is None for r in rows)
    assert not any(email in str(value).lower() for row in rows for value in row)
