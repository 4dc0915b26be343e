"""Statements that arrive from the site's feed, end to end: a real HTTP server plays the
site, the poller runs through the API (and once by itself, as the worker's cron), blasts
go through a real worker to the recording SMTP server, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from helpers import editor_token, seed_subscribers, sql, text_body, wait_until
from siteserver import STATEMENT_PAGE, SiteServer, entry, no_feeds, poll, rss
from smtpserver import SmtpServer

from mailer.config import FeedMode, Settings
from mailer.db import make_engine, make_sessionmaker
from mailer.editors import add_editor
from mailer.feed_actions import NOTICE_SUBJECT, site_drafts


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def statements_from_site(settings: Settings) -> list[tuple[Any, ...]]:
    return await sql(settings, "SELECT id, title, author, url, source FROM statements ORDER BY id")


@pytest.fixture
async def site() -> AsyncIterator[SiteServer]:
    server = await SiteServer().start()
    yield server
    await server.stop()


@pytest.fixture
def feed_mode() -> str:
    return "blast"


@pytest.fixture
def settings_overrides(site: SiteServer, feed_mode: str) -> dict[str, Any]:
    return {"feed_urls": [site.url("/feed.xml")], "feed_mode": FeedMode(feed_mode)}


def html_part(message: Any) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None, "no HTML part"
    return str(part.get_content())


async def test_blast_mode_first_poll_mails_nothing_then_each_subscriber_gets_the_new_one_once(
    app_client: httpx.AsyncClient,
    settings: Settings,
    smtp: SmtpServer,
    site: SiteServer,
    start_worker: Any,
) -> None:
    people = await seed_subscribers(settings, confirmed=4, pending=2, unsubscribed=2)
    token = await editor_token(settings)
    await start_worker(settings=no_feeds(settings))
    entries = [entry(site, 1), entry(site, 2)]
    site.serve("/feed.xml", rss(entries), "application/rss+xml")

    [first] = await poll(app_client, token)
    assert (first["status"], first["entries"], first["new"]) == ("first run", 2, [])
    assert await statements_from_site(settings) == []
    [again] = await poll(app_client, token)
    assert again["status"] == "not modified"  # the ETag of the first answer was sent back
    assert site.hits_of("/feed.xml")[-1].headers.get("if-none-match")

    entries.append(entry(site, 3, STATEMENT_PAGE))
    site.serve("/feed.xml", rss(entries), "application/rss+xml")
    # Two polls at once (the cron and a CMS hook, say): one statement, one blast.
    both = await asyncio.gather(poll(app_client, token), poll(app_client, token))
    found = [n for reports in both for report in reports for n in report["new"]]
    assert len(found) == 1 and found[0]["action"].startswith("blast ")
    assert found[0]["title"] == "Statement number 3"
    [(sid, title, author, url, source)] = await statements_from_site(settings)
    assert (title, author, url, source) == (
        "Statement number 3",
        "Press Office",
        site.url("/statements/3"),
        "feed",
    )

    await wait_until(lambda: len(smtp.messages) >= 4, timeout=60)
    # Many more polls, one with the entry's guid changed (a CMS migration): nothing new.
    entries[2]["guid"] = "https://campaign.example/?p=3"
    site.serve("/feed.xml", rss(entries), "application/rss+xml")
    for _ in range(8):
        for report in await poll(app_client, token):
            assert report["status"] in ("ok", "not modified") and report["new"] == []
    await asyncio.sleep(1.0)
    assert len(await statements_from_site(settings)) == 1
    assert await sql(settings, "SELECT count(*) FROM blasts") == [(1,)]
    counts = smtp.recorder.counts()
    assert counts == {address: 1 for address in people["confirmed"]}

    message = smtp.messages[0].message
    assert message["Subject"] == "Statement number 3"
    body = html_part(message)
    assert f'src="{site.url("/media/rally.jpg")}"' in body
    assert 'alt="Supporters at the rally"' in body
    assert f'href="{site.url("/statements/earlier-one")}"' in body
    assert f'href="{site.url("/statements/3")}"' in body  # "Read online": the entry
    assert "https://www.youtube.com/watch?v=abc123XYZ" in body
    assert "https://twitter.com/campaign/status/1790000000000000000" in body
    for banned in ("<script", "<iframe", "onclick", "widgets.js"):
        assert banned not in body, banned
    text = text_body(message).replace("\r\n", "\n")
    paragraphs = [
        "The campaign answered today. Read our earlier statement",
        "Second paragraph of the statement.",
        "We will not back down.",
        "Third paragraph, the last one.",
    ]
    positions = [text.index(p) for p in paragraphs]
    assert positions == sorted(positions)
    assert "\n\nSecond paragraph of the statement.\n\n" in text
    assert "widgets.js" not in text and "track(" not in text
    assert f"Read online: {site.url('/statements/3')}" in text


@pytest.mark.parametrize("feed_mode", ["hold"])
async def test_hold_mode_keeps_a_draft_tells_the_editors_and_one_action_sends_it(
    app_client: httpx.AsyncClient,
    settings: Settings,
    smtp: SmtpServer,
    site: SiteServer,
    start_worker: Any,
) -> None:
    people = await seed_subscribers(settings, confirmed=3)
    token = await editor_token(settings)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    async with sessions() as session:
        await add_editor(session, "Desk", email="Desk@Campaign.example")
    await start_worker(settings=no_feeds(settings))
    site.serve("/feed.xml", rss([entry(site, 1)]), "application/rss+xml")
    assert (await poll(app_client, token))[0]["status"] == "first run"

    site.serve("/feed.xml", rss([entry(site, 1), entry(site, 2, STATEMENT_PAGE)]), "text/xml")
    [report] = await poll(app_client, token)
    [new] = report["new"]
    assert new["action"] == "held"
    sid = new["statement_id"]
    notices = await asyncio.to_thread(smtp.wait_for, 1)
    assert [m.rcpt for m in notices] == ["desk@campaign.example"]  # only editors with one
    notice = notices[0].message
    assert notice["Subject"] == NOTICE_SUBJECT
    assert "List-Unsubscribe" not in notice
    assert f"{settings.base_url}/admin/statements/{sid}" in text_body(notice)
    assert f"{settings.base_url}/admin/statements/{sid}" in html_part(notice)
    assert await sql(settings, "SELECT count(*) FROM blasts") == [(0,)]
    async with sessions() as session:
        assert [s.id for s in await site_drafts(session)] == [sid]
    for _ in range(3):  # the draft is not announced again
        assert (await poll(app_client, token))[0]["new"] == []
    await asyncio.sleep(0.5)
    assert len(smtp.messages) == 1

    r = await app_client.post("/api/blasts", json={"statement_id": sid}, headers=auth(token))
    assert r.status_code == 202, r.text
    await wait_until(lambda: len(smtp.messages) >= 4, timeout=60)
    await asyncio.sleep(0.5)
    counts = smtp.recorder.counts()
    assert {a: counts.get(a) for a in people["confirmed"]} == {a: 1 for a in people["confirmed"]}
    assert "<iframe" not in html_part(smtp.recorder.to(people["confirmed"][0])[0].message)
    async with sessions() as session:
        assert await site_drafts(session) == []
    await engine.dispose()


async def test_feed_poll_needs_an_editor_token(
    app_client: httpx.AsyncClient, settings: Settings
) -> None:
    assert (await app_client.post("/api/feeds/poll")).status_code == 401
    r = await app_client.post("/api/feeds/poll", headers=auth("mlr_wrong"))
    assert r.status_code == 403
    assert await sql(settings, "SELECT count(*) FROM feeds") == [(0,)]


async def test_the_worker_polls_by_itself_every_feed_poll_s(
    settings: Settings, site: SiteServer, start_worker: Any, smtp: SmtpServer
) -> None:
    site.serve("/feed.xml", rss([entry(site, 1)]), "application/rss+xml")
    await start_worker(settings=settings.model_copy(update={"feed_poll_s": 1}))
    await wait_until(lambda: len(site.hits_of("/feed.xml")) >= 3, timeout=30)
    rows = await sql(settings, "SELECT first_run_done, last_ok_at, last_error FROM feeds")
    assert len(rows) == 1 and rows[0][0] and rows[0][1] is not None and rows[0][2] is None
    site.serve("/feed.xml", rss([entry(site, 1), entry(site, 2)]), "application/rss+xml")
    await wait_until(lambda: statements_from_site(settings), timeout=30)
    [(_, title, *_rest)] = await statements_from_site(settings)
    assert title == "Statement number 2"


@pytest.mark.parametrize("feed_mode", ["blast"])
async def test_many_new_entries_at_once_are_held_even_in_blast_mode(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer, site: SiteServer
) -> None:
    token = await editor_token(settings)
    await seed_subscribers(settings, confirmed=2)
    engine = make_engine(settings.database_url)
    async with make_sessionmaker(engine)() as session:
        await add_editor(session, "Desk", email="desk@campaign.example")
    await engine.dispose()
    site.serve("/feed.xml", rss([entry(site, 1)]), "application/rss+xml")
    await poll(app_client, token)
    site.serve("/feed.xml", rss([entry(site, n) for n in range(1, 6)]), "application/rss+xml")
    [report] = await poll(app_client, token)
    assert [n["action"] for n in report["new"]] == ["held"] * 4
    assert [n["title"] for n in report["new"]] == [f"Statement number {n}" for n in (2, 3, 4, 5)]
    assert await sql(settings, "SELECT count(*) FROM blasts") == [(0,)]
    [notice] = await asyncio.to_thread(smtp.wait_for, 1)
    assert notice.rcpt == "desk@campaign.example"
    assert notice.message["Subject"] == "4 new statements on the site: review and send"
    assert "more than 3" in text_body(notice.message)


@pytest.mark.parametrize("feed_mode", ["hold"])
async def test_a_notice_the_relay_deferred_is_sent_at_the_next_poll(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer, site: SiteServer
) -> None:
    token = await editor_token(settings)
    engine = make_engine(settings.database_url)
    async with make_sessionmaker(engine)() as session:
        await add_editor(session, "Desk", email="desk@campaign.example")
    await engine.dispose()
    site.serve("/feed.xml", rss([entry(site, 1)]), "application/rss+xml")
    await poll(app_client, token)
    smtp.recorder.plan = lambda rcpt, attempt: "451 4.3.0 try again later" if attempt == 1 else None
    site.serve("/feed.xml", rss([entry(site, 1), entry(site, 2)]), "application/rss+xml")
    [report] = await poll(app_client, token)
    assert [n["action"] for n in report["new"]] == ["owed"]
    assert smtp.messages == []
    [report] = await poll(app_client, token)  # nothing new in the feed: the notice goes now
    assert report["new"] == []
    [notice] = await asyncio.to_thread(smtp.wait_for, 1)
    assert notice.message["Subject"] == NOTICE_SUBJECT
    await poll(app_client, token)
    await asyncio.sleep(0.3)
    assert len(smtp.messages) == 1
    assert len(await statements_from_site(settings)) == 1
