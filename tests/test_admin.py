"""The editors' admin UI: security over real HTTP (both databases), and the whole editor
and subscriber journey in a real Chromium against a real uvicorn (SQLite).

Screenshots of every page land in tests/artifacts/ and are checked not to be blank.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    csrf_of,
    editor_token,
    find_link,
    login,
    queue_settled,
    reconcile_once,
    seed_subscribers,
    sql,
    subscriber,
    table_counts,
    tampered,
    text_body,
    wait_until,
)
from playwright.async_api import Browser, Page, async_playwright, expect
from playwright.async_api import Error as PlaywrightError
from smtpserver import SmtpServer

from mailer.config import Settings
from mailer.tokens import Tokens

ARTIFACTS = Path(__file__).parent / "artifacts"


def session_cookie_header(r: httpx.Response) -> str:
    cookies = [c for c in r.headers.get_list("set-cookie") if c.startswith("mailer_admin=")]
    assert len(cookies) == 1, r.headers.get_list("set-cookie")
    return cookies[0]


# Security, over HTTP, on SQLite and PostgreSQL ------------------------------------------


async def test_admin_needs_a_session_and_a_real_token(
    live: httpx.AsyncClient, settings: Settings
) -> None:
    token = await editor_token(settings)
    for path in (
        "/admin",
        "/admin/statements",
        "/admin/statements/new",
        "/admin/blasts",
        "/admin/blasts/1/progress.json",
        "/admin/subscribers",
        "/admin/queue",
        "/admin/queue.json",
        "/admin/statements/1/preview",
    ):
        r = await live.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/admin/login", path
    page = await live.get("/admin/login")
    assert page.status_code == 200 and 'name="token"' in page.text
    assert page.headers["cache-control"] == "no-store"
    for wrong in (token + "x", "", "mlr_" + "a" * 43, "x" * 5000):
        r = await live.post("/admin/login", data={"token": wrong})
        assert r.status_code == 401, wrong[:20]
        assert "not valid" in r.text
        assert not any(c.startswith("mailer_admin=") for c in r.headers.get_list("set-cookie"))
    # A forged or tampered session cookie is no session.
    live.cookies.set("mailer_admin", "eyJlIjoxLCJjIjoiYWJjIn0.AAAAAA.forged", path="/admin")
    r = await live.get("/admin/statements")
    assert r.status_code == 303 and r.headers["location"] == "/admin/login"
    live.cookies.clear()
    # The right token logs in; the cookie is HttpOnly, SameSite=Lax, scoped to /admin.
    r = await login(live, token)
    cookie = session_cookie_header(r).lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/admin" in cookie
    assert "max-age=43200" in cookie and "secure" not in cookie  # plain-http BASE_URL
    assert token not in cookie
    page = await live.get("/admin/statements")
    assert page.status_code == 200 and "Signed in as editor" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    # Log out (a CSRF-checked POST) and the pages are closed again.
    r = await live.post("/admin/logout", data={"csrf_token": csrf_of(page.text)})
    assert r.status_code == 303 and r.headers["location"] == "/admin/login"
    assert (await live.get("/admin/statements")).status_code == 303


@pytest.mark.parametrize("settings_overrides", [{"base_url": "https://127.0.0.1:{port}"}])
async def test_session_cookie_is_secure_behind_https(
    live: httpx.AsyncClient, settings: Settings
) -> None:
    r = await login(live, await editor_token(settings))
    cookie = session_cookie_header(r).lower()
    assert "; secure" in cookie and "httponly" in cookie and "samesite=lax" in cookie
    assert (await live.get("/admin/statements")).status_code == 200


async def test_forged_posts_are_refused_and_write_nothing(
    live: httpx.AsyncClient, settings: Settings, smtp: SmtpServer
) -> None:
    await seed_subscribers(settings, confirmed=3)
    token = await editor_token(settings)
    await login(live, token)
    csrf = csrf_of((await live.get("/admin/statements/new")).text)
    draft = {"title": "Forged", "body_markdown": "Hello", "author": "", "url": ""}
    r = await live.post("/admin/statements", data=draft | {"csrf_token": csrf})
    assert r.status_code == 303
    sid = int(r.headers["location"].rsplit("/", 1)[1])
    sub_id = int((await sql(settings, "SELECT min(id) FROM subscribers"))[0][0])
    before = await table_counts(settings)
    forged: list[tuple[str, dict[str, str]]] = [
        ("/admin/statements", draft),
        (f"/admin/statements/{sid}", draft | {"title": "Changed"}),
        (f"/admin/statements/{sid}/test", {"to": "victim@example.com"}),
        (f"/admin/statements/{sid}/blast", {"when": "now"}),
        (f"/admin/subscribers/{sub_id}/erase", {}),
        ("/admin/preview", draft | {"draft_id": "abcdefgh12"}),
        ("/admin/logout", {}),
    ]
    for path, body in forged:
        for extra in ({}, {"csrf_token": ""}, {"csrf_token": tampered(csrf)}):
            r = await live.post(path, data=body | extra)
            assert r.status_code == 403, (path, extra, r.status_code)
            assert "Nothing was changed" in r.text
        # The token in a header of a cross-site form is as good as none at all.
        r = await live.post(path, data=body, headers={"x-csrf-token": "nope"})
        assert r.status_code == 403
    assert await table_counts(settings) == before
    assert smtp.messages == []
    title = await sql(settings, "SELECT title FROM statements WHERE id = :i", i=sid)
    assert title[0][0] == "Forged"
    # Without the session cookie the same post just goes to the login page.
    async with httpx.AsyncClient(base_url=settings.base_url) as stranger:
        r = await stranger.post("/admin/statements", data=draft | {"csrf_token": csrf})
        assert r.status_code == 303 and r.headers["location"] == "/admin/login"
    assert await table_counts(settings) == before
    # Blast actions too: a scheduled blast is not cancelled by a forged post.
    r = await live.post(
        f"/admin/statements/{sid}/blast",
        data={"csrf_token": csrf, "when": "at", "send_at": "2099-01-01T09:00"},
    )
    assert r.status_code == 303
    bid = int((await sql(settings, "SELECT id FROM blasts"))[0][0])
    r = await live.post(f"/admin/blasts/{bid}/cancel", data={})
    assert r.status_code == 403
    assert (await sql(settings, "SELECT status FROM blasts"))[0][0] == "scheduled"
    # The scheduled time was read as UTC, as the form says.
    progress = (await live.get(f"/admin/blasts/{bid}/progress.json")).json()
    assert progress["send_at"].startswith("2099-01-01T09:00:00") and progress["send_at"].endswith(
        "+00:00"
    )
    # A statement with a blast can no longer be edited, with a clear message.
    r = await live.post(
        f"/admin/statements/{sid}", data=draft | {"title": "Edited", "csrf_token": csrf}
    )
    assert r.status_code == 409 and "can&#39;t be edited" in r.text and f"#{bid}" in r.text
    title = await sql(settings, "SELECT title FROM statements WHERE id = :i", i=sid)
    assert title[0][0] == "Forged"
    r = await live.post(f"/admin/blasts/{bid}/cancel", data={"csrf_token": csrf})
    assert r.status_code == 303
    assert (await sql(settings, "SELECT status FROM blasts"))[0][0] == "cancelled"


async def test_bad_form_input_is_explained_and_writes_nothing(
    live: httpx.AsyncClient, settings: Settings, smtp: SmtpServer
) -> None:
    await login(live, await editor_token(settings))
    csrf = csrf_of((await live.get("/admin/statements/new")).text)
    r = await live.post(
        "/admin/statements",
        data={"csrf_token": csrf, "title": "A", "body_markdown": "Hello", "url": "javascript:x"},
    )
    assert r.status_code == 422 and "url must be an absolute" in r.text
    r = await live.post(
        "/admin/statements", data={"csrf_token": csrf, "title": "A", "body_markdown": "Hi"}
    )
    sid = int(r.headers["location"].rsplit("/", 1)[1])
    before = await table_counts(settings)
    cases = [
        (f"/admin/statements/{sid}/test", {"to": "not-an-address"}, 422, "not-an-address"),
        (f"/admin/statements/{sid}/test", {"to": ", ".join(["a@b.co"] * 21)}, 422, "at most 20"),
        (f"/admin/statements/{sid}/blast", {"when": "at", "send_at": ""}, 422, "UTC"),
        (f"/admin/statements/{sid}/blast", {"when": "at", "send_at": "soon"}, 422, "not a date"),
        (
            f"/admin/statements/{sid}/blast",
            {"when": "at", "send_at": "2001-01-01T00:00"},
            422,
            "in the past",
        ),
        (f"/admin/statements/{sid}", {"title": "", "body_markdown": "x"}, 422, "title"),
        ("/admin/blasts/4242/pause", {}, 404, "no blast"),
    ]
    for path, body, status, words in cases:
        r = await live.post(path, data=body | {"csrf_token": csrf})
        assert r.status_code == status, (path, body, r.status_code)
        assert words in r.text, (path, words)
        assert 'role="alert"' in r.text
    assert await table_counts(settings) == before
    assert smtp.messages == []
    # A draft without a blast can still be edited.
    r = await live.post(
        f"/admin/statements/{sid}",
        data={"csrf_token": csrf, "title": "Better title", "body_markdown": "Hi *there*"},
    )
    assert r.status_code == 303
    row = await sql(settings, "SELECT title, body_html FROM statements WHERE id = :i", i=sid)
    assert row[0][0] == "Better title" and "<em>there</em>" in row[0][1]


async def test_draft_preview_renders_the_email_without_saving(
    live: httpx.AsyncClient, settings: Settings
) -> None:
    await login(live, await editor_token(settings))
    page = (await live.get("/admin/statements/new")).text
    draft_id = re.search(r'name="draft_id" value="([^"]+)"', page)
    assert draft_id
    body = {
        "csrf_token": csrf_of(page),
        "draft_id": draft_id.group(1),
        "title": "Draft <b>title</b>",
        "body_markdown": "Hello <script>alert(1)</script> **world**",
    }
    r = await live.post("/admin/preview", data=body)
    assert r.status_code == 200, r.text
    url = r.json()["url"]
    html = await live.get(url)
    assert html.status_code == 200
    assert "Draft &lt;b&gt;title&lt;/b&gt;" in html.text and "<strong>world</strong>" in html.text
    assert "<script" not in html.text
    assert html.headers["content-security-policy"].startswith("sandbox;")
    assert html.headers["x-frame-options"] == "SAMEORIGIN"
    assert (await table_counts(settings))["statements"] == 0
    # Another editor's session cannot read this draft.
    async with httpx.AsyncClient(base_url=settings.base_url) as other:
        await login(other, await editor_token(settings, "someone else"))
        assert (await other.get(url)).status_code == 404
    r = await live.post("/admin/preview", data=body | {"draft_id": "../../x"})
    assert r.status_code == 422


async def test_pages_have_no_inline_script_or_style(
    live: httpx.AsyncClient, settings: Settings
) -> None:
    """The CSP would block them silently; catch them here instead."""
    ids = await seed_subscribers(settings, confirmed=1)
    pages = {"/admin/login": (await live.get("/admin/login")).text}
    await login(live, await editor_token(settings))
    csrf = csrf_of((await live.get("/admin/statements/new")).text)
    r = await live.post(
        "/admin/statements", data={"csrf_token": csrf, "title": "T", "body_markdown": "B"}
    )
    sid = int(r.headers["location"].rsplit("/", 1)[1])
    await live.post(f"/admin/statements/{sid}/blast", data={"csrf_token": csrf, "when": "now"})
    sub = await subscriber(settings, ids["confirmed"][0])
    assert sub is not None
    for path in (
        "/admin/statements",
        "/admin/statements/new",
        f"/admin/statements/{sid}",
        "/admin/blasts",
        "/admin/blasts/1",
        "/admin/subscribers",
        f"/admin/subscribers/{sub.id}",
        "/admin/queue",
    ):
        r = await live.get(path)
        assert r.status_code == 200, path
        pages[path] = r.text
    for path, html in pages.items():
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), path
        assert " style=" not in html and "<style" not in html, path
        assert not re.search(r"<[^>]+\son[a-z]+=", html), path
    preview = await live.get(f"/admin/statements/{sid}/preview")
    assert preview.status_code == 200 and "<h1" in preview.text
    assert preview.headers["content-security-policy"].startswith("sandbox")
    q = (await live.get("/admin/queue.json")).json()
    assert len(q["per_minute"]) == 60 and {"queued", "in_progress", "deferred"} <= set(q)


# The browser journey (SQLite) -----------------------------------------------------------


def assert_not_blank(png: Path) -> None:
    from PIL import Image

    with Image.open(png) as image:
        gray = image.convert("L")
        low, high = gray.getextrema()
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert high - low > 60, f"{png.name} has no contrast"
    assert colours is None or len(colours) > 8, f"{png.name} is nearly one colour"
    assert png.stat().st_size > 5000, f"{png.name} is suspiciously small"


class TestInBrowser:
    @pytest.fixture
    def db_url(self, tmp_path: Path) -> str:
        return f"sqlite+aiosqlite:///{tmp_path / 'mailer.db'}"

    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        # Slow enough to pause a blast in the middle, fast enough for a short test.
        return {"rate_per_second": 25.0, "rate_burst": 2, "batch_size": 10}

    @pytest.fixture
    async def browser(self) -> AsyncIterator[Browser]:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield browser
            await browser.close()

    @pytest.mark.slow(25)
    async def test_editor_and_subscriber_journey(
        self,
        live: httpx.AsyncClient,
        settings: Settings,
        smtp: SmtpServer,
        start_worker: Any,
        browser: Browser,
    ) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        shots: list[Path] = []
        csp_errors: list[str] = []

        async def shot(page: Page, name: str) -> None:
            path = ARTIFACTS / f"admin-{len(shots) + 1:02d}-{name}.png"
            try:
                await page.screenshot(path=str(path), full_page=True)
            except PlaywrightError as e:
                # Chromium's compositor sometimes has no frame to give when a loaded machine
                # asks right after a navigation ("Unable to capture screenshot": once, on
                # the confirm page, in a full suite on a slow machine). That is the
                # browser's hiccup, not the page's: let it paint and ask once more. A blank
                # page still fails below, and a second refusal fails here.
                if "Unable to capture screenshot" not in str(e):
                    raise
                await page.evaluate("() => new Promise(r => requestAnimationFrame(() => r()))")
                await page.screenshot(path=str(path), full_page=True)
            assert (await page.inner_text("body")).strip(), name
            shots.append(path)

        def watch(page: Page) -> None:
            page.on(
                "console",
                lambda m: (
                    csp_errors.append(m.text) if "Content Security Policy" in m.text else None
                ),
            )
            page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))

        base = settings.base_url
        people = await seed_subscribers(settings, confirmed=50)
        token = await editor_token(settings)
        await start_worker()
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        watch(page)

        # Log in ---------------------------------------------------------------------
        await page.goto(f"{base}/admin")
        assert urlsplit(page.url).path == "/admin/login"
        await shot(page, "login")
        await page.get_by_label("Editor token").fill("wrong")
        await page.get_by_role("button", name="Log in").click()
        await page.get_by_text("That editor token is not valid").wait_for()
        await page.get_by_label("Editor token").fill(token)
        await page.get_by_role("button", name="Log in").click()
        await page.wait_for_url(f"{base}/admin/statements")
        await page.get_by_text("Signed in as editor").wait_for()
        await shot(page, "statements-empty")

        # Compose with a live preview, save, test ----------------------------------------
        title = "Spring statement on the river"
        await page.get_by_role("link", name="New statement").click()
        await page.get_by_label("Title").fill(title)
        await page.get_by_label("Author").fill("The campaign team")
        await page.get_by_label("Text").fill(
            "We met the council **today**.\n\n- cleaner water\n- open banks\n\n"
            "[Read more](https://example.org/river)"
        )
        preview = page.frame_locator("#preview")
        await preview.locator("h1", has_text=title).wait_for(timeout=10_000)
        await preview.locator("strong", has_text="today").wait_for()
        await page.get_by_text("Preview updated.").wait_for()
        await shot(page, "compose-preview")
        await page.get_by_role("button", name="Save draft").click()
        await page.wait_for_url(re.compile(r".*/admin/statements/\d+$"))
        await page.get_by_text("Saved draft #1.").wait_for()
        await preview.locator("h1", has_text=title).wait_for()

        await page.get_by_label("Send a test copy to").fill("editor.test@example.net")
        await page.get_by_role("button", name="Send test").click()
        await page.get_by_text("Test copy sent to editor.test@example.net.").wait_for()
        tests = smtp.recorder.to("editor.test@example.net")
        assert len(tests) == 1 and tests[0].message["Subject"] == f"[TEST] {title}"
        assert "today" in text_body(tests[0].message)
        await shot(page, "statement-tested")

        # Blast now to 50 and watch the bar reach 100 %; one mailbox does not exist --------
        gone = people["confirmed"][3]
        reply = f"550 5.1.1 <{gone}>: mailbox unknown"
        smtp.recorder.plan = lambda rcpt, attempt: reply if rcpt == gone else None
        await page.get_by_role("button", name="Blast now").click()
        await page.wait_for_url(f"{base}/admin/blasts")
        await page.get_by_text("Blast #1 started.").wait_for()
        bar1 = page.locator("#blast-1 [role=progressbar]")
        seen: set[str] = set()
        deadline = time.monotonic() + 30
        while (now := await bar1.get_attribute("aria-valuenow")) != "100":
            seen.add(str(now))
            assert time.monotonic() < deadline, f"progress stuck at {now}"
            await asyncio.sleep(0.1)
        assert seen, "the bar never showed a value below 100"  # it moved without a reload
        await (
            page.locator("#blast-1 [data-field=text]")
            .get_by_text("100% · 49 sent, 1 failed, 0 skipped of 50")
            .wait_for()
        )
        await page.locator("#blast-1 [data-field=status]").get_by_text("done").wait_for()
        counts = smtp.recorder.counts()
        reached = [a for a in people["confirmed"] if a != gone]
        assert all(counts.get(a) == 1 for a in reached) and gone not in counts
        await shot(page, "blast-done")
        await page.get_by_role("link", name="#1", exact=True).click()
        failure = page.get_by_role("row").filter(has_text=gone)
        await failure.get_by_role("cell", name="550", exact=True).wait_for()
        await failure.get_by_text("mailbox unknown").wait_for()
        await shot(page, "blast-detail")

        # A slower blast to 200: pause it in the middle, then resume -----------------------
        more = await seed_subscribers(settings, confirmed=150, prefix="more")
        await page.goto(f"{base}/admin/statements/new")
        await page.get_by_label("Title").fill("Second statement")
        await page.get_by_label("Text").fill("More news.")
        await page.get_by_role("button", name="Save draft").click()
        await page.get_by_text("Saved draft #2.").wait_for()
        await page.get_by_role("button", name="Blast now").click()
        await page.get_by_text("Blast #2 started.").wait_for()
        bar2 = page.locator("#blast-2 [role=progressbar]")
        await wait_until(
            lambda: _percent_above(bar2, 0), timeout=15
        )  # sending has begun, on its own
        await page.get_by_role("button", name="Pause blast #2").click()
        await page.get_by_text("Blast #2 paused.").wait_for()
        await page.locator("#blast-2 [data-field=status]").get_by_text("paused").wait_for()
        await shot(page, "blast-paused")

        def sent2() -> int:
            return sum(1 for m in smtp.messages if m.message["Subject"] == "Second statement")

        # Chunks already claimed when the pause landed may finish; then nothing more goes.
        at_pause = sent2()
        await queue_settled(settings, timeout=15)  # else: "a paused blast kept sending"
        held = sent2()
        await reconcile_once(settings)
        await queue_settled(settings)
        assert sent2() == held, "a paused blast was started again"
        assert held < 199, "the blast finished before the pause took effect"
        assert held - at_pause <= 100, (at_pause, held)
        await page.get_by_role("button", name="Resume blast #2").click()
        await page.get_by_text("Blast #2 resumed.").wait_for()
        await (
            page.locator("#blast-2 [data-field=status]")
            .get_by_text("done")
            .wait_for(timeout=30_000)
        )
        assert await bar2.get_attribute("aria-valuenow") == "100"
        second = [m for m in smtp.messages if m.message["Subject"] == "Second statement"]
        # The hard bounce is out of the audience; everybody else got exactly one copy.
        assert sorted(m.rcpt for m in second) == sorted(reached + more["confirmed"])

        # Queue panel with its chart ------------------------------------------------------
        await page.get_by_role("link", name="Queue").click()
        # (Polled from Python: wait_for_function would need eval, which the CSP forbids.)
        await expect(page.locator("#rate-chart rect.col")).to_have_count(60)
        heights = await page.locator("#rate-chart rect.col").evaluate_all(
            "els => els.map(e => e.getBBox().height)"
        )
        assert max(heights) > 100 and min(heights) == 0, heights  # drawn to scale
        sent_text = page.locator("#sent-last-hour")
        await wait_until(lambda: _number(sent_text, at_least=200), timeout=10)
        chart_title = await page.locator("#rate-chart title").first.text_content()
        assert chart_title and "in all" in chart_title
        await shot(page, "queue")

        # Subscribers: counts, search, history, erase -----------------------------------------
        await page.get_by_role("link", name="Subscribers").click()
        await page.locator(".counts").get_by_text("199 confirmed").wait_for()
        await page.get_by_label("Search by address").fill("moreconf000007")
        await page.get_by_role("button", name="Search").click()
        await page.get_by_text("1 matching").wait_for()
        await shot(page, "subscribers")
        await page.get_by_role("link", name="more" + "conf000007@example.com").click()
        await page.get_by_role("heading", name="History").wait_for()
        await shot(page, "subscriber")
        await page.get_by_role("button", name="Erase this subscriber").click()
        await page.get_by_text("Subscriber #").wait_for()
        assert await subscriber(settings, "moreconf000007@example.com") is None

        # Phone width: usable, no sideways scrolling ---------------------------------------
        phone = await browser.new_context(viewport={"width": 390, "height": 844})
        await phone.add_cookies(await context.cookies())
        small = await phone.new_page()
        watch(small)
        for path, name in (
            ("/admin/blasts", "phone-blasts"),
            ("/admin/statements/1", "phone-statement"),
        ):
            await small.goto(f"{base}{path}")
            overflow = await small.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 1, f"{path} scrolls sideways on a phone by {overflow}px"
            if path.startswith("/admin/statements"):
                mail = small.frame_locator("#preview").locator("h1", has_text=title)
                await mail.wait_for()
                # Full-page shots leave an off-screen frame blank; bring it into view first.
                await small.locator("#preview").scroll_into_view_if_needed()
            await shot(small, name)
        await phone.close()

        # The public side: sign up → confirm → unsubscribe ----------------------------------
        visitor = await browser.new_context(viewport={"width": 1000, "height": 800})
        public = await visitor.new_page()
        watch(public)
        await public.goto(f"{base}/subscribe")
        await shot(public, "subscribe")
        await public.get_by_label("Email address").fill("reader@example.org")
        await public.get_by_label("Name").fill("Rea Der")
        await public.get_by_role("button", name="Subscribe").click()
        await public.get_by_text("a confirmation link is on its way").wait_for()
        await shot(public, "subscribe-done")
        mail = await wait_until(lambda: smtp.recorder.to("reader@example.org"), timeout=20)
        link = find_link(text_body(mail[0].message), "confirm")
        await public.goto(link)
        await shot(public, "confirm")
        await public.get_by_role("button", name="Confirm").click()
        await public.get_by_role("heading", name="You're subscribed").wait_for()
        await shot(public, "confirmed")
        reader = await subscriber(settings, "reader@example.org")
        assert reader is not None and reader.status == "confirmed"
        tokens = Tokens(settings.signing_keys, settings.confirm_token_ttl_s)
        await public.goto(f"{base}/unsubscribe/{tokens.unsubscribe(reader.id)}")
        await shot(public, "unsubscribe")
        await public.get_by_role("button", name="Unsubscribe").click()
        await public.get_by_role("heading", name="You're unsubscribed").wait_for()
        await shot(public, "unsubscribed")
        reader = await subscriber(settings, "reader@example.org")
        assert reader is not None and reader.status == "unsubscribed"
        await visitor.close()

        # Log out ------------------------------------------------------------------------------
        await page.get_by_role("button", name="Log out").click()
        await page.get_by_text("Signed out.").wait_for()
        await page.goto(f"{base}/admin/blasts")
        assert urlsplit(page.url).path == "/admin/login"
        await context.close()

        assert csp_errors == [], csp_errors
        for png in shots:
            assert_not_blank(png)


async def _percent_above(bar: Any, floor: int) -> bool:
    return int(await bar.get_attribute("aria-valuenow") or 0) > floor


async def _number(locator: Any, at_least: int) -> bool:
    text = (await locator.text_content() or "").strip()
    return text.isdigit() and int(text) >= at_least


async def test_api_test_send_shares_the_admin_path(
    live: httpx.AsyncClient, settings: Settings, smtp: SmtpServer
) -> None:
    """The API and the admin call the same function: same subject, same marker header."""
    token = await editor_token(settings)
    auth = {"Authorization": f"Bearer {token}"}
    r = await live.post(
        "/api/statements", json={"title": "Shared", "body_markdown": "Body"}, headers=auth
    )
    sid = r.json()["id"]
    r = await live.post(f"/api/statements/{sid}/test", json={"to": ["A@Example.org"]}, headers=auth)
    assert r.status_code == 200 and r.json()["results"] == {"a@example.org": "sent"}
    r = await live.post(f"/api/statements/{sid}/test", json={"to": ["nope"]}, headers=auth)
    assert r.status_code == 422 and r.json()["detail"].startswith("to:")
    await login(live, token)
    csrf = csrf_of((await live.get(f"/admin/statements/{sid}")).text)
    r = await live.post(f"/admin/statements/{sid}/test", data={"csrf_token": csrf, "to": "b@x.org"})
    assert r.status_code == 303
    api_copy, admin_copy = smtp.recorder.to("a@example.org")[0], smtp.recorder.to("b@x.org")[0]
    for copy in (api_copy, admin_copy):
        assert copy.message["Subject"] == "[TEST] Shared"
        assert copy.message["X-Mailer-Test"] == "yes"
