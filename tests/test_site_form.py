"""The sign-up form on the campaign site: CORS for MAILER_ALLOWED_ORIGINS only, 403 for
other sites, a redirect back to the site (never elsewhere), the page kept with the
consent, /embed.js, the snippet, and a real Chromium signing up from a second origin."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import events, subscriber, wait_until
from playwright.async_api import Browser, async_playwright, expect
from siteserver import SiteServer
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from mailer.config import Settings
from mailer.tokens import Tokens
from mailer.web.site_form import SnippetError, form_snippet

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
EVIL = "https://evil.example"


@pytest.fixture
async def site() -> AsyncIterator[SiteServer]:
    server = await SiteServer().start()
    yield server
    await server.stop()


@pytest.fixture
def settings_overrides(site: SiteServer) -> dict[str, Any]:
    return {"allowed_origins": [site.origin]}


def cors_of(r: httpx.Response) -> str | None:
    value = r.headers.get("access-control-allow-origin")
    return str(value) if value is not None else None


async def test_cors_answers_the_site_and_refuses_other_origins(
    app_client: httpx.AsyncClient, settings: Settings, site: SiteServer
) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    r = await app_client.options("/subscribe", headers={"Origin": site.origin} | preflight)
    assert r.status_code == 204 and cors_of(r) == site.origin
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "content-type" in r.headers["access-control-allow-headers"].lower()
    assert "Origin" in r.headers["vary"]

    body = {"email": "fan@example.com"}
    r = await app_client.post("/subscribe", json=body, headers={"Origin": site.origin})
    assert r.status_code == 202 and cors_of(r) == site.origin and "Origin" in r.headers["vary"]
    r = await app_client.post("/subscribe", json={"email": "nope"}, headers={"Origin": site.origin})
    assert r.status_code == 422 and cors_of(r) == site.origin  # the script can read why

    other_port = site.origin.rsplit(":", 1)[0] + f":{site.port + 1}"
    for foreign in (EVIL, other_port, site.origin.replace("http://", "https://")):
        r = await app_client.options("/subscribe", headers={"Origin": foreign} | preflight)
        assert r.status_code == 403 and cors_of(r) is None, foreign
        r = await app_client.post(
            "/subscribe", json={"email": "victim@example.com"}, headers={"Origin": foreign}
        )
        assert r.status_code == 403 and cors_of(r) is None, foreign
        assert "not allowed" in r.json()["detail"]
        r = await app_client.post(
            "/subscribe", data={"email": "victim@example.com"}, headers={"Origin": foreign}
        )
        assert r.status_code == 403 and "not allowed" in r.text
    assert await subscriber(settings, "victim@example.com") is None

    # No Origin (a server, curl) or "null" (a no-referrer page): nothing to refuse.
    r = await app_client.post("/subscribe", json={"email": "curl@example.com"})
    assert r.status_code == 202 and cors_of(r) is None
    r = await app_client.post(
        "/subscribe", json={"email": "n@example.com"}, headers={"Origin": "null"}
    )
    assert r.status_code == 202 and cors_of(r) is None
    # Our own /subscribe page is always allowed.
    own = settings.base_url
    r = await app_client.post(
        "/subscribe", data={"email": "own@example.com"}, headers={"Origin": own}
    )
    assert r.status_code == 202
    for address in ("fan@example.com", "curl@example.com", "n@example.com", "own@example.com"):
        assert await subscriber(settings, address) is not None, address


async def test_redirect_goes_back_to_the_site_and_nowhere_else(
    app_client: httpx.AsyncClient, settings: Settings, site: SiteServer
) -> None:
    thanks = site.url("/thanks?from=form")
    r = await app_client.post(
        "/subscribe",
        data={"email": "a@example.com", "redirect": thanks},
        headers={"Origin": site.origin},
    )
    assert r.status_code == 303 and r.headers["location"] == thanks
    assert cors_of(r) == site.origin
    for bad in (
        f"{EVIL}/phish",
        "//evil.example/phish",
        "javascript:alert(1)",
        f"http://evil@{site.origin.removeprefix('http://')}/x",
        site.origin + "\\@evil.example/",
        "/relative/path",
        site.origin.replace("http://", "https://") + "/x",
    ):
        r = await app_client.post("/subscribe", data={"email": "b@example.com", "redirect": bad})
        assert r.status_code == 202 and "location" not in r.headers, bad
        assert "confirmation link" in r.text
    # JSON callers get JSON, whatever the field says.
    r = await app_client.post("/subscribe", json={"email": "c@example.com", "redirect": thanks})
    assert r.status_code == 202 and r.json()["status"] == "accepted"
    own = f"{settings.base_url}/subscribe?done=1"
    r = await app_client.post("/subscribe", data={"email": "d@example.com", "redirect": own})
    assert r.status_code == 303 and r.headers["location"] == own


async def test_the_page_signed_up_on_is_kept_with_the_consent(
    app_client: httpx.AsyncClient, settings: Settings, site: SiteServer
) -> None:
    page = site.url("/issues/housing")
    r = await app_client.post(
        "/subscribe",
        data={"email": "reader@example.com", "source": page},
        headers={"Origin": site.origin},
    )
    assert r.status_code == 202
    sub = await subscriber(settings, "reader@example.com")
    assert sub is not None
    [signup] = [e for e in await events(settings, sub.id) if e.kind == "signup"]
    assert signup.detail == f"source: {page}"
    token = Tokens(settings.signing_keys, settings.confirm_token_ttl_s).confirm(sub.id)
    assert (await app_client.post(f"/confirm/{token}")).status_code == 200
    sub = await subscriber(settings, "reader@example.com")
    assert sub is not None and sub.consent_source == f"double opt-in via {page}"

    hostile = "line\r\nInjected: yes\x00\u2028" + "x" * 1000
    r = await app_client.post("/subscribe", json={"email": "h@example.com", "source": hostile})
    assert r.status_code == 202
    sub = await subscriber(settings, "h@example.com")
    assert sub is not None
    [signup] = [e for e in await events(settings, sub.id) if e.kind == "signup"]
    source = (signup.detail or "").removeprefix("source: ")
    assert source.startswith("line Injected: yes x") and len(source) == 200
    assert not re.search(r"[\x00-\x1f\u2028]", source)
    r = await app_client.post("/subscribe", json={"email": "i@example.com", "source": 42})
    assert r.status_code == 202  # not text: ignored


async def test_a_source_or_redirect_that_is_not_text_is_refused_and_writes_nothing(
    app_client: httpx.AsyncClient, settings: Settings
) -> None:
    for field, value in (("source", 123), ("redirect", ["https://x"]), ("source", {"a": 1})):
        r = await app_client.post("/subscribe", json={"email": "t@example.com", field: value})
        assert r.status_code == 422, (field, value, r.text)
        assert r.json()["field"] == field
    assert await subscriber(settings, "t@example.com") is None


async def test_embed_js_is_our_own_small_cacheable_script(app_client: httpx.AsyncClient) -> None:
    r = await app_client.get("/embed.js")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert re.fullmatch(r"public, max-age=\d+", r.headers["cache-control"])
    assert r.headers["cross-origin-resource-policy"] == "cross-origin"
    js = r.text
    assert "fetch(form.action" in js and "textContent" in js
    for banned in ("eval(", "innerHTML", "new Function", "document.write", "import("):
        assert banned not in js, banned
    assert not re.search(r"https?://[a-z0-9]", js)  # loads nothing from anywhere else
    again = await app_client.get("/embed.js", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


async def test_the_snippet_is_a_plain_form_with_an_optional_script(
    settings: Settings, site: SiteServer
) -> None:
    html = form_snippet(settings, source='home "page"', redirect=site.url("/thanks"))
    assert f'<form class="mailer-form" action="{settings.base_url}/subscribe" method="post"' in html
    assert 'name="email" required' in html and 'name="website"' in html
    assert 'name="source" value="home &quot;page&quot;"' in html
    assert f'name="redirect" value="{site.url("/thanks")}"' in html
    assert f'<script src="{settings.base_url}/embed.js" defer></script>' in html
    assert "<script" not in form_snippet(settings, script=False)
    with pytest.raises(SnippetError, match="MAILER_ALLOWED_ORIGINS"):
        form_snippet(settings, redirect=f"{EVIL}/thanks")


class TestInBrowser:
    @pytest.fixture
    def db_url(self, tmp_path: Path) -> str:
        return f"sqlite+aiosqlite:///{tmp_path / 'mailer.db'}"

    @pytest.fixture
    async def browser(self) -> AsyncIterator[Browser]:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield browser
            await browser.close()

    @staticmethod
    def page_with_form(server: SiteServer, snippet: str) -> None:
        async def home(_: Request) -> Response:
            return HTMLResponse(f"<!doctype html><title>Campaign</title><h1>Campaign</h1>{snippet}")

        async def thanks(_: Request) -> Response:
            return HTMLResponse("<!doctype html><title>Thanks</title><p>Check your inbox.</p>")

        server.route("/", home)
        server.route("/thanks", thanks)

    async def test_signing_up_through_the_snippet_on_the_site(
        self, live: httpx.AsyncClient, settings: Settings, site: SiteServer, browser: Browser
    ) -> None:
        self.page_with_form(site, form_snippet(settings, redirect=site.url("/thanks")))
        context = await browser.new_context()
        page = await context.new_page()
        problems: list[str] = []
        # Script errors and CSP refusals; an HTTP error status (the 422 below) is an answer.
        page.on(
            "console",
            lambda m: (
                problems.append(m.text)
                if m.type == "error" and not m.text.startswith("Failed to load resource")
                else None
            ),
        )
        await page.goto(site.url("/"))
        await page.fill("input[name=email]", "Browser.Reader@Example.com")
        await page.click("button[type=submit]")
        message = page.locator("[data-mailer-message]")
        await expect(message).to_contain_text("confirmation link is on its way")
        assert page.url == site.url("/")  # answered in place
        assert await page.input_value("input[name=email]") == ""
        sub = await wait_until(lambda: subscriber(settings, "browser.reader@example.com"))
        [signup] = [e for e in await events(settings, sub.id) if e.kind == "signup"]
        assert signup.detail == f"source: {site.url('/')}"
        await expect(message).to_have_attribute("data-state", "ok")
        await page.fill("input[name=email]", "not an address")
        await page.eval_on_selector("form", "f => f.noValidate = true")
        await page.click("button[type=submit]")
        await expect(message).to_contain_text("email:")
        await expect(message).to_have_attribute("data-state", "error")
        assert problems == [], problems
        await context.close()

        # Without JavaScript the same snippet posts normally and comes back to the site.
        context = await browser.new_context(java_script_enabled=False)
        page = await context.new_page()
        await page.goto(site.url("/"))
        await page.fill("input[name=email]", "no.script@example.com")
        await page.click("button[type=submit]")
        await page.wait_for_url(site.url("/thanks"))
        assert "Check your inbox." in await page.inner_text("body")
        assert await subscriber(settings, "no.script@example.com") is not None
        await context.close()

    async def test_the_snippet_on_another_site_signs_nobody_up(
        self, live: httpx.AsyncClient, settings: Settings, browser: Browser
    ) -> None:
        other = await SiteServer().start()
        try:
            self.page_with_form(other, form_snippet(settings))
            context = await browser.new_context()
            page = await context.new_page()
            await page.goto(other.url("/"))
            await page.fill("input[name=email]", "victim@example.com")
            await page.click("button[type=submit]")
            await expect(page.locator("[data-mailer-message]")).to_contain_text(
                "Could not reach the server"
            )
            await context.close()
        finally:
            await other.stop()
        assert await subscriber(settings, "victim@example.com") is None
