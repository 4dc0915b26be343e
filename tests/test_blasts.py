"""Statements and blasts end to end: one copy each, unsubscribe wins, pause/resume/cancel."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from helpers import (
    auth,
    blast,
    editor_token,
    find_link,
    progress,
    publish,
    queue_settled,
    reconcile_once,
    seed_subscribers,
    sql,
    subscriber,
    subscriber_ids,
    table_counts,
    text_body,
    wait_status,
    wait_until,
)
from smtpserver import SmtpServer

from mailer.config import Settings


async def test_editor_auth(app_client: httpx.AsyncClient, settings: Settings) -> None:
    token = await editor_token(settings)
    r = await app_client.post("/api/statements", json={"title": "x", "body_markdown": "y"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = await app_client.get("/api/statements/1", headers=auth(token + "x"))
    assert r.status_code == 403
    r = await app_client.get("/api/statements/1", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    rows = await sql(settings, "SELECT token_hash FROM editors")
    assert rows and token not in rows[0][0]  # only the hash is stored
    sid = await publish(app_client, token)
    owner = await sql(settings, "SELECT editor_id FROM statements WHERE id = :i", i=sid)
    assert owner[0][0] is not None


async def test_blast_reaches_each_confirmed_subscriber_once(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    people = await seed_subscribers(settings, confirmed=200, pending=50, unsubscribed=50)
    token = await editor_token(settings)
    await start_worker()
    bid = await blast(app_client, token, await publish(app_client, token))
    done = await wait_status(app_client, token, bid, "done")
    assert done["total"] == 200 and done["sent"] == 200
    assert done["failed"] == 0 and done["skipped"] == 0 and done["pending"] == 0
    assert done["started_at"] and done["finished_at"]
    counts = smtp.recorder.counts()
    assert {a: counts.get(a, 0) for a in people["confirmed"]} == {a: 1 for a in people["confirmed"]}
    assert not any(a in counts for a in people["pending"] + people["unsubscribed"])
    assert len(smtp.messages) == 200


@pytest.mark.parametrize(
    "settings_overrides", [{"base_url": "https://127.0.0.1:{port}", "feedback_id": "a:b:c:mailer"}]
)
async def test_headers_on_the_wire(
    live: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    # settings_overrides can't know the port; the fixture filled it in (see conftest)
    people = await seed_subscribers(settings, confirmed=3)
    token = await editor_token(settings)
    await start_worker()
    md = "# ignored\n\nHello <script>alert(1)</script> **bold** [link](javascript:alert(2))"
    sid = await publish(live, token, title="Grüße — «A» = B 🎉", body_markdown=md)
    bid = await blast(live, token, sid)
    await wait_status(live, token, bid, "done")
    assert len(smtp.messages) == 3
    for received in smtp.messages:
        raw = received.data
        head = raw.split(b"\r\n\r\n", 1)[0]
        names = [
            line.split(b":", 1)[0].lower()
            for line in head.split(b"\r\n")
            if line and not line[:1].isspace()
        ]
        for name in (
            b"from", b"to", b"subject", b"date", b"message-id", b"list-id",
            b"list-unsubscribe", b"list-unsubscribe-post", b"mime-version", b"content-type",
            b"feedback-id",
        ):  # fmt: skip
            assert names.count(name) == 1, (name, names)
        lu = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"list-unsubscribe:")][0]
        assert b"=?" not in lu
        uris = re.findall(rb"<([^>]+)>", lu)
        assert len(uris) == 2
        assert uris[0].startswith(b"https://") and uris[1].startswith(b"mailto:")
        assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in head
        msg = received.message
        assert msg.get_content_type() == "multipart/alternative"
        parts = [p.get_content_type() for p in msg.iter_parts()]
        assert parts == ["text/plain", "text/html"]
        assert msg["Subject"] == "Grüße — «A» = B 🎉"
        html = msg.get_body(preferencelist=("html",)).get_content()
        i = html.lower().find("<script")
        assert i < 0 and 'href="javascript:' not in html, html[i - 300 : i + 100]
        header_url = uris[0].decode()
        assert header_url in html and header_url in text_body(msg)
        assert msg["To"] == received.rcpt
    # The body link shows a page; the header URI takes a one-click POST.
    first = smtp.messages[0]
    url = find_link(text_body(first.message), "unsubscribe")
    assert url.startswith(settings.base_url)
    page = await live.get(urlsplit(url).path)
    assert page.status_code == 200 and "<button" in page.text
    r = await live.post(
        urlsplit(url).path,
        content=b"List-Unsubscribe=One-Click",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200 and "location" not in r.headers
    sub = await subscriber(settings, first.rcpt)
    assert sub is not None and sub.status == "unsubscribed"
    assert all(a in people["confirmed"] for a in smtp.recorder.counts())


RACE_S = 0.5


# 10/s: the leavers, last in the list, are due 7-10 s in, and the 30 unsubscribes start
# at 1 s. At 25/s a busy test process (one unsubscribe every ~0.1 s) was overtaken by the
# blast: 19 leavers were mailed before they left (rightly), and only 11 were skipped.
@pytest.mark.parametrize("settings_overrides", [{"rate_per_second": 10, "rate_burst": 2}])
async def test_unsubscribe_wins_during_a_slow_blast(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    people = await seed_subscribers(settings, confirmed=100)
    token = await editor_token(settings)
    await start_worker()
    bid = await blast(app_client, token, await publish(app_client, token))
    await wait_until(lambda: len(smtp.messages) >= 10)
    ids = await subscriber_ids(settings, people["confirmed"])
    from mailer.tokens import Tokens

    tokens = Tokens(settings.signing_keys, settings.confirm_token_ttl_s)
    leavers = people["confirmed"][-30:]  # the end of the list: not yet sent
    committed: dict[str, float] = {}
    for address in leavers:
        r = await app_client.post(f"/unsubscribe/{tokens.unsubscribe(ids[address])}")
        assert r.status_code == 200
        committed[address] = time.time()
        await asyncio.sleep(0.02)
    done = await wait_status(app_client, token, bid, "done", timeout=60)
    # Begun (MAIL reached the server) after the unsubscribe was committed, by more than
    # RACE_S. A send whose re-check read just before the commit still goes: its reply can
    # reach the worker after this loop has served the whole unsubscribe (one loop runs
    # both), and the end of its message later still. Such a send begins within moments of
    # the commit. A worker that skipped the re-check would mail the leavers seconds after
    # they left (they are last in a 10-second blast), and `skipped` would be near 0.
    late = [
        (m.rcpt, round(m.started - committed[m.rcpt], 3))
        for m in smtp.messages
        if m.rcpt in committed and m.started > committed[m.rcpt] + RACE_S
    ]
    assert late == []
    mailed = {m.rcpt for m in smtp.messages if m.rcpt in committed}
    assert done["skipped"] == len(leavers) - len(mailed)  # each leaver: mailed or skipped
    assert done["skipped"] >= 10  # most leavers were still queued when they left
    assert done["sent"] + done["skipped"] == 100
    counts = smtp.recorder.counts()
    assert all(n == 1 for n in counts.values())


async def test_the_send_time_recheck_runs_outside_a_transaction(settings: Settings) -> None:
    """On PostgreSQL the re-check needs no BEGIN and ROLLBACK (db.single_reads: one round
    trip, not three): each statement is a transaction of its own, so it sees every
    unsubscribe committed before it; the pooled connection is in a transaction again
    for everyone else. On SQLite it stays a deferred read transaction."""
    from sqlalchemy import text

    from mailer.db import make_engine, single_reads, single_writes
    from mailer.delivery.sender import _STILL_SUBSCRIBED

    people = await seed_subscribers(settings, confirmed=3)
    ids = await subscriber_ids(settings, people["confirmed"])
    engine = make_engine(settings.database_url)
    txid = text("SELECT txid_current()")
    try:
        postgres = engine.dialect.name == "postgresql"
        if postgres:
            # The recorder's single-statement flush (db.single_writes) runs the same way.
            writes = single_writes(engine)
            assert writes is not None
            for reads, own_transactions in ((single_reads(engine), True), (writes, True),
                                            (engine, False)):  # fmt: skip
                async with reads.connect() as conn:
                    first, second = [(await conn.execute(txid)).scalar() for _ in range(2)]
                    assert (first != second) is own_transactions
        leaver = people["confirmed"][0]
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE subscribers SET status = 'unsubscribed' WHERE id = :id"),
                {"id": ids[leaver]},
            )
        async with single_reads(engine).connect() as conn:
            rows = await conn.execute(_STILL_SUBSCRIBED[postgres], {"ids": list(ids.values())})
            alive = {email for _, email in rows}
        assert alive == set(people["confirmed"]) - {leaver}
    finally:
        await engine.dispose()
    assert (single_writes(engine) is None) is not postgres  # SQLite: a transaction, always


@pytest.mark.slow(15)
async def test_pause_resume_cancel_and_schedule(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    await seed_subscribers(settings, confirmed=240)
    token = await editor_token(settings)
    slow = settings.model_copy(update={"rate_per_second": 40.0, "rate_burst": 2})
    await start_worker(settings=slow)
    bid = await blast(app_client, token, await publish(app_client, token, title="one"))
    await wait_until(lambda: len(smtp.messages) >= 20)
    r = await app_client.post(f"/api/blasts/{bid}/pause", headers=auth(token))
    assert r.status_code == 200 and r.json()["status"] == "paused"
    paused_at = len(smtp.messages)
    await queue_settled(settings)  # the batch jobs saw the pause and ended
    after = len(smtp.messages)
    # In flight when paused: at most one chunk (rate × 5 s = 200 here, far less in practice).
    assert after - paused_at <= settings.batch_size
    await reconcile_once(settings)  # the reconciler does not wake a paused blast either
    await queue_settled(settings)
    assert len(smtp.messages) == after  # stopped for good
    assert (
        await app_client.post(f"/api/blasts/{bid}/pause", headers=auth(token))
    ).status_code == 409
    r = await app_client.post(f"/api/blasts/{bid}/resume", headers=auth(token))
    assert r.status_code == 200 and r.json()["status"] == "sending"
    done = await wait_status(app_client, token, bid, "done", timeout=60)
    assert done["sent"] == 240 and len(smtp.messages) == 240

    # cancel: the rest stays unsent and the counters say so
    smtp.recorder.clear()
    bid2 = await blast(app_client, token, await publish(app_client, token, title="two"))
    await wait_until(lambda: len(smtp.messages) >= 10)
    r = await app_client.post(f"/api/blasts/{bid2}/cancel", headers=auth(token))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    await queue_settled(settings)  # what was in flight has been recorded
    p = await progress(app_client, token, bid2)
    assert p["status"] == "cancelled"
    assert p["cancelled"] > 0 and p["pending"] == 0
    assert p["sent"] + p["cancelled"] + p["skipped"] + p["failed"] == 240
    assert p["sent"] == len(smtp.messages)
    assert (
        await app_client.post(f"/api/blasts/{bid2}/resume", headers=auth(token))
    ).status_code == 409

    # schedule 2 s ahead: starts then, not before
    smtp.recorder.clear()
    await start_worker()  # a fast worker too
    sid3 = await publish(app_client, token, title="three")
    at = time.time() + 2
    from datetime import UTC, datetime

    bid3 = await blast(app_client, token, sid3, send_at=datetime.fromtimestamp(at, UTC).isoformat())
    assert (await progress(app_client, token, bid3))["status"] == "scheduled"
    await reconcile_once(settings)  # not due yet: the reconciler leaves it alone
    assert (
        smtp.messages == [] and (await progress(app_client, token, bid3))["status"] == "scheduled"
    )
    await wait_until(lambda: smtp.messages, timeout=20)
    assert min(m.at for m in smtp.messages) >= at
    done = await wait_status(app_client, token, bid3, "done", timeout=60)
    assert datetime.fromisoformat(done["started_at"]).timestamp() >= at
    assert done["sent"] == 240


async def test_bad_input_is_refused_and_writes_nothing(
    app_client: httpx.AsyncClient, settings: Settings, start_worker: Any
) -> None:
    await seed_subscribers(settings, confirmed=5)
    token = await editor_token(settings)
    sid = await publish(app_client, token)
    before = await table_counts(settings)
    h = auth(token)
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/api/statements", {"title": "", "body_markdown": "x"}, 422, "title"),
        ("/api/statements", {"title": "   ", "body_markdown": "x"}, 422, "title"),
        ("/api/statements", {"title": "T", "body_markdown": "x" * 2_000_000}, 413, "larger"),
        (
            "/api/statements",
            {"title": "T\r\nBcc: x@example.com", "body_markdown": "x"},
            422,
            "title",
        ),
        ("/api/statements", {"body_markdown": "x"}, 422, "title"),
        (
            "/api/statements",
            {"title": "T", "body_markdown": "x", "url": "javascript:x"},
            422,
            "url",
        ),
        ("/api/blasts", {"statement_id": 999_999}, 422, "statement_id"),
        ("/api/blasts", {"statement_id": "abc"}, 422, "statement_id"),
        ("/api/blasts", {"statement_id": sid, "send_at": "tomorrow-ish"}, 422, "send_at"),
        ("/api/blasts", {"statement_id": sid, "send_at": "2026-13-45T99:00:00Z"}, 422, "send_at"),
        ("/api/blasts", {"statement_id": sid, "send_at": "2030-01-01T10:00:00"}, 422, "send_at"),
    ]
    for path, body, status, word in cases:
        r = await app_client.post(path, json=body, headers=h)
        assert r.status_code == status, (body, r.status_code, r.text[:300])
        assert word in r.json()["detail"], (body, r.json())
    r = await app_client.post(
        "/api/statements", content=b"{not json", headers=h | {"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert await table_counts(settings) == before
    # a second blast of a statement whose blast is still active
    first = await blast(app_client, token, sid, send_at="2099-01-01T00:00:00Z")
    before = await table_counts(settings)
    r = await app_client.post("/api/blasts", json={"statement_id": sid}, headers=h)
    assert r.status_code == 409 and str(first) in r.json()["detail"]
    assert await table_counts(settings) == before
    assert (await app_client.post("/api/blasts/424242/pause", headers=h)).status_code == 404
