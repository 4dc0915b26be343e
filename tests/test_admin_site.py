"""The site in the admin UI (issue 15): the "Form for your site" page (the snippet, which
origins may post it, feed health), the "From the site" drafts with their one-click send,
"Poll feeds now", and the mark on statements from the site.

A real HTTP server plays the campaign site and its feed; sends go through a real worker
to the recording SMTP server; SQLite and PostgreSQL. One Chromium test clicks through
the pages as an editor does, the copy button included.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    auth,
    csrf_of,
    editor_token,
    login,
    publish,
    seed_subscribers,
    sql,
    tampered,
    wait_status,
    wait_until,
)
from playwright.async_api import async_playwright, expect
from siteserver import STATEMENT_PAGE, SiteServer, entry, no_feeds, rss
from smtpserver import SmtpServer
from starlette.requests import Request
from starlette.responses import Response

from mailer.config import FeedMode, Settings
from mailer.runtime import Runtime
from mailer.web.site_form import form_snippet

SITE_ORIGIN = "https://campaign.example"
TEXTAREA = re.compile(r'<textarea id="snippet"[^>]*>(.*?)</textarea>', re.S)
FLASH = re.compile(r'<p class="flash flash-(ok|error)"[^>]*>(.*?)</p>', re.S)


@pytest.fixture
async def site() -> AsyncIterator[SiteServer]:
    server = await SiteServer().start()
    yield server
    await server.stop()


@pytest.fixture
def feed_timeout_s() -> float:
    """Generous: a fetch from the local site must not time out because the machine is
    busy. The test of a poll that finds another running sets it short, since "Poll feeds
    now" then waits that long for the other poll before it says so."""
    return 30.0


@pytest.fixture
def settings_overrides(site: SiteServer, feed_timeout_s: float) -> dict[str, Any]:
    return {
        "feed_urls": [site.url("/feed.xml"), site.url("/broken.xml")],
        "feed_mode": FeedMode.hold,
        "allowed_origins": [SITE_ORIGIN],
        "feed_timeout_s": feed_timeout_s,
    }


def snippet_of(html: str) -> str:
    match = TEXTAREA.search(html)
    assert match, "no snippet on the page"
    return unescape(match.group(1))


def flash_of(html: str) -> tuple[str, str]:
    match = FLASH.search(html)
    assert match, "no flash message"
    return match.group(1), unescape(match.group(2))


async def poll_in_admin(client: httpx.AsyncClient, csrf: str) -> tuple[str, str]:
    r = await client.post("/admin/from-site/poll", data={"csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/admin/from-site", r.text
    return flash_of((await client.get("/admin/from-site")).text)


async def test_form_page_shows_the_snippet_the_origins_and_feed_health(
    app_client: httpx.AsyncClient, settings: Settings, site: SiteServer
) -> None:
    await login(app_client, await editor_token(settings))
    page = await app_client.get("/admin/site")
    assert page.status_code == 200
    # The snippet, escaped in the page, is exactly what site_form makes.
    assert snippet_of(page.text) == form_snippet(settings, source="", script=True)
    assert "&lt;form class=" in page.text and '<form class="mailer-form"' not in page.text
    assert f"&lt;script src=&#34;{settings.base_url}/embed.js&#34;" in page.text
    assert 'data-copy="snippet"' in page.text
    assert f"<code>{SITE_ORIGIN}</code>" in page.text
    assert page.text.count("not polled yet") == 2  # both feeds, before any poll

    # The editor's options make the snippet; a redirect off the allowed origins is refused.
    thanks = f"{SITE_ORIGIN}/thanks"
    r = await app_client.get(
        "/admin/site", params={"source": "home page box", "redirect": thanks, "script": "no"}
    )
    assert r.status_code == 200
    made = snippet_of(r.text)
    assert made == form_snippet(settings, source="home page box", redirect=thanks, script=False)
    assert 'name="redirect" value="https://campaign.example/thanks"' in made
    assert "embed.js" not in made
    r = await app_client.get("/admin/site", params={"redirect": "https://evil.example/x"})
    assert r.status_code == 422
    kind, text = flash_of(r.text)
    assert kind == "error" and "'https://evil.example/x' is not on an origin" in text
    assert 'name="redirect"' not in snippet_of(r.text)
    # Markup in the options stays text.
    r = await app_client.get("/admin/site", params={"source": '"><script>alert(1)</script>'})
    assert "<script>alert" not in r.text
    assert 'value="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in snippet_of(r.text)

    # Feed health after a poll: one feed works, the other answers 500 and says so.
    site.serve("/feed.xml", rss([entry(site, 1)]), "application/rss+xml")

    async def broken(_: Request) -> Response:
        return Response("down for maintenance", 500)

    site.route("/broken.xml", broken)
    csrf = csrf_of(page.text)
    kind, text = await poll_in_admin(app_client, csrf)
    assert kind == "error"  # one feed failed
    assert f"{site.url('/feed.xml')}: first run" in text
    assert f"{site.url('/broken.xml')}: failed" in text and "500" in text
    health = (await app_client.get("/admin/site")).text
    rows = re.findall(r'<tr class="feed">(.*?)</tr>', health, re.S)
    assert len(rows) == 2
    assert site.url("/feed.xml") in rows[0] and ">ok<" in rows[0]
    assert site.url("/broken.xml") in rows[1] and ">failing<" in rows[1] and "500" in rows[1]


async def test_without_origins_or_feeds_the_pages_say_what_to_set(
    app_client: httpx.AsyncClient, settings: Settings
) -> None:
    bare = settings.model_copy(update={"allowed_origins": [], "feed_urls": []})
    from mailer.web.app import create_app

    app = create_app(bare)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=bare.base_url) as client:
            await login(client, await editor_token(bare))
            page = (await client.get("/admin/site")).text
            assert "MAILER_ALLOWED_ORIGINS</code> is not set" in page
            assert "No feed is configured" in page
            drafts = await client.get("/admin/from-site")
            assert "Poll feeds now</button>" in drafts.text and " disabled>" in drafts.text
            r = await client.post("/admin/from-site/poll", data={"csrf_token": csrf_of(page)})
            assert r.status_code == 409
            assert "No feed to poll: set MAILER_FEED_URLS" in r.text


async def test_a_draft_from_the_site_is_sent_with_one_click(
    app_client: httpx.AsyncClient,
    settings: Settings,
    smtp: SmtpServer,
    site: SiteServer,
    start_worker: Any,
) -> None:
    people = await seed_subscribers(settings, confirmed=3, unsubscribed=1)
    token = await editor_token(settings)
    await start_worker(settings=no_feeds(settings))
    own = await publish(app_client, token, title="Written by hand")
    site.serve("/feed.xml", rss([entry(site, 1)]), "application/rss+xml")
    site.serve("/broken.xml", rss([]), "application/rss+xml")
    await login(app_client, token)
    csrf = csrf_of((await app_client.get("/admin/from-site")).text)

    kind, text = await poll_in_admin(app_client, csrf)
    assert kind == "ok" and "first run" in text  # the backlog is never mailed
    site.serve("/feed.xml", rss([entry(site, 1), entry(site, 2, STATEMENT_PAGE)]), "text/xml")
    kind, text = await poll_in_admin(app_client, csrf)
    assert kind == "ok" and "1 new: “Statement number 2” (held)" in text
    [(sid,)] = await sql(settings, "SELECT id FROM statements WHERE source = 'feed'")

    page = (await app_client.get("/admin/from-site")).text
    assert page.count('class="panel site-draft"') == 1
    assert "Statement number 2" in page and "to the 3 confirmed subscribers" in page
    assert f'action="/admin/from-site/{sid}/send"' in page
    # The statements list marks the one from the site, not the one written by hand.
    listing = (await app_client.get("/admin/statements")).text
    marked = re.findall(
        r'<a href="/admin/statements/(\d+)">[^<]*</a> <span class="badge badge-site"', listing
    )
    assert marked == [str(sid)] and f'href="/admin/statements/{own}"' in listing

    # Without the CSRF token: refused, nothing sent.
    for extra in ({}, {"csrf_token": tampered(csrf)}):
        r = await app_client.post(f"/admin/from-site/{sid}/send", data=extra)
        assert r.status_code == 403
    # Not a statement from the site, or none at all: 404, no blast.
    for other in (own, 999999):
        r = await app_client.post(f"/admin/from-site/{other}/send", data={"csrf_token": csrf})
        assert r.status_code == 404 and "is not a statement from the site" in r.text
    assert await sql(settings, "SELECT count(*) FROM blasts") == [(0,)]

    r = await app_client.post(f"/admin/from-site/{sid}/send", data={"csrf_token": csrf})
    assert r.status_code == 303
    [(blast_id, statement_id, editor_id)] = await sql(
        settings, "SELECT id, statement_id, editor_id FROM blasts"
    )
    assert statement_id == sid and editor_id is not None
    assert r.headers["location"] == f"/admin/blasts/{blast_id}"
    kind, text = flash_of((await app_client.get(r.headers["location"])).text)
    assert kind == "ok" and f"Blast #{blast_id} started" in text
    # Done, not three messages and a pause: counted once the worker has recorded them.
    done = await wait_status(app_client, token, blast_id, "done", timeout=60)
    assert done["sent"] == 3
    assert smtp.recorder.counts() == {a: 1 for a in people["confirmed"]}
    assert smtp.messages[0].message["Subject"] == "Statement number 2"

    # Sent: no longer waiting, and a second click (a stale page) sends nothing more.
    assert "Nothing waiting" in (await app_client.get("/admin/from-site")).text
    r = await app_client.post(f"/admin/from-site/{sid}/send", data={"csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"] == f"/admin/blasts/{blast_id}"
    kind, text = flash_of((await app_client.get(r.headers["location"])).text)
    assert kind == "error" and f"already went out in blast #{blast_id}" in text
    assert await sql(settings, "SELECT count(*) FROM blasts") == [(1,)]
    r = await app_client.get(f"/api/blasts/{blast_id}", headers=auth(token))
    assert r.json()["statement_id"] == sid


@pytest.mark.parametrize("feed_timeout_s", [1.0])
async def test_poll_now_while_another_poll_runs_says_so(
    app_client: httpx.AsyncClient, settings: Settings, site: SiteServer
) -> None:
    site.serve("/feed.xml", rss([entry(site, 1)]), "application/rss+xml")
    await login(app_client, await editor_token(settings))
    csrf = csrf_of((await app_client.get("/admin/from-site")).text)
    runtime = Runtime.create(settings)
    lock = runtime.redis.lock(runtime.keys.feed_poll_lock, timeout=60)
    try:
        assert await lock.acquire()
        r = await app_client.post("/admin/from-site/poll", data={"csrf_token": csrf})
        assert r.status_code == 409
        assert "another poll of the feeds is still running" in unescape(r.text)
        assert site.hits_of("/feed.xml") == []
    finally:
        await lock.release()
        await runtime.close()
    r = await app_client.post("/admin/from-site/poll", data={"csrf_token": csrf})
    assert r.status_code == 303 and len(site.hits_of("/feed.xml")) == 1
    assert (await app_client.post("/admin/from-site/poll")).status_code == 403  # CSRF


class TestInBrowser:
    @pytest.fixture
    def db_url(self, tmp_path: Path) -> str:
        return f"sqlite+aiosqlite:///{tmp_path / 'mailer.db'}"

    async def test_an_editor_copies_the_snippet_and_sends_a_draft_from_the_site(
        self,
        live: httpx.AsyncClient,
        settings: Settings,
        smtp: SmtpServer,
        site: SiteServer,
        start_worker: Any,
    ) -> None:
        base = settings.base_url
        people = await seed_subscribers(settings, confirmed=2)
        token = await editor_token(settings)
        await start_worker(settings=no_feeds(settings))
        site.serve("/feed.xml", rss([entry(site, 1)]), "application/rss+xml")
        site.serve("/broken.xml", rss([]), "application/rss+xml")
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context(
                    permissions=["clipboard-read", "clipboard-write"]
                )
                page = await context.new_page()
                csp: list[str] = []
                page.on(
                    "console",
                    lambda m: csp.append(m.text) if "Content Security" in m.text else None,
                )
                page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
                await page.goto(f"{base}/admin/login")
                await page.get_by_label("Editor token").fill(token)
                await page.get_by_role("button", name="Log in").click()
                await page.wait_for_url(f"{base}/admin/statements")

                nav = page.get_by_role("navigation", name="Admin sections")
                await nav.get_by_role("link", name="Form for your site").click()
                await page.wait_for_url(f"{base}/admin/site")
                await expect(page.get_by_role("heading", name="Form for your site")).to_be_visible()
                await page.get_by_role("button", name="Copy the snippet").click()
                await expect(page.locator("#copy-status")).to_have_text("Copied.")
                copied = await page.evaluate("navigator.clipboard.readText()")
                assert copied == form_snippet(settings, source="", script=True)

                # A statement arrives from the site; the editor polls and sends it.
                await nav.get_by_role("link", name="From the site").click()
                await page.wait_for_url(f"{base}/admin/from-site")
                await page.get_by_role("button", name="Poll feeds now").click()
                await expect(page.get_by_text("first run").first).to_be_visible()
                site.serve(
                    "/feed.xml",
                    rss([entry(site, 1), entry(site, 2, STATEMENT_PAGE)]),
                    "application/rss+xml",
                )
                await page.get_by_role("button", name="Poll feeds now").click()
                draft = page.locator(".site-draft")
                await expect(draft).to_have_count(1)
                await expect(draft.get_by_role("link", name="Statement number 2")).to_be_visible()
                await draft.get_by_role("button", name="Send to all subscribers").click()
                await page.wait_for_url(re.compile(rf"{re.escape(base)}/admin/blasts/\d+$"))
                await expect(page.get_by_text("started:")).to_be_visible()
                await wait_until(lambda: len(smtp.messages) >= 2, timeout=60)
                assert smtp.recorder.counts() == {a: 1 for a in people["confirmed"]}

                await nav.get_by_role("link", name="Statements").click()
                row = page.locator("tr", has_text="Statement number 2")
                await expect(row.get_by_text("from the site")).to_be_visible()
                assert csp == []
            finally:
                await browser.close()
