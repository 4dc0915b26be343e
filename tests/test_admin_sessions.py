"""Admin sessions can be ended (docs/security.md): logout ends every copy of the cookie,
`mailer editors disable|rotate` end an editor's sessions and API access, cookies signed
with an old key open nothing, and a sign-in posted from another site is refused.
"""

from __future__ import annotations

import re

import httpx
import pytest
import redis.asyncio as aioredis
from helpers import editor_token, mailer
from itsdangerous import URLSafeTimedSerializer
from pydantic import SecretStr

from mailer.config import Settings
from mailer.web.app import create_app

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
OLD_KEY = "an-old-key-kept-for-old-unsubscribe-links"


async def login(client: httpx.AsyncClient, token: str, **headers: str) -> str:
    """Sign in; returns the session cookie's value."""
    r = await client.post("/admin/login", data={"token": token}, headers=headers)
    assert r.status_code == 303, r.text
    return client.cookies["mailer_admin"]


def with_cookie(settings: Settings, value: str) -> httpx.AsyncClient:
    """Another browser (or a thief) with a copy of the cookie."""
    client = httpx.AsyncClient(base_url=settings.base_url, timeout=10)
    client.cookies.set("mailer_admin", value, path="/admin")
    return client


async def signed_in(client: httpx.AsyncClient) -> bool:
    r = await client.get("/admin/statements")
    assert r.status_code in (200, 303)
    return r.status_code == 200


async def session_keys(redis: aioredis.Redis, settings: Settings) -> list[bytes]:
    return [k async for k in redis.scan_iter(f"{settings.queue_name}:admin:session:*")]


async def test_logout_ends_the_session_for_every_copy_of_the_cookie(
    live: httpx.AsyncClient, settings: Settings, redis: aioredis.Redis
) -> None:
    cookie = await login(live, await editor_token(settings))
    # The cookie holds a signed random id, nothing else; Redis holds only its hash.
    session_id = URLSafeTimedSerializer(
        settings.signing_keys[-1], salt="mailer.admin.session"
    ).loads(cookie)
    assert isinstance(session_id, str) and len(session_id) == 43
    keys = await session_keys(redis, settings)
    assert len(keys) == 1 and session_id.encode() not in keys[0]
    assert session_id.encode() not in (await redis.get(keys[0]) or b"")
    async with with_cookie(settings, cookie) as copy:
        assert await signed_in(copy)
        page = await live.get("/admin/statements")
        match = CSRF.search(page.text)
        assert match
        r = await live.post("/admin/logout", data={"csrf_token": match.group(1)})
        assert r.status_code == 303
        assert not await signed_in(copy)  # the copy died with the session
    assert await session_keys(redis, settings) == []


async def test_a_cookie_signed_with_an_old_key_opens_nothing(
    app_client: httpx.AsyncClient, settings: Settings
) -> None:
    """Keys kept for old unsubscribe links verify links, never admin cookies."""
    rotated = settings.model_copy(update={"old_secret_keys": [SecretStr(OLD_KEY)]})
    assert rotated.signing_keys[0] == OLD_KEY
    cookie = await login(app_client, await editor_token(settings))
    current = URLSafeTimedSerializer(settings.signing_keys[-1], salt="mailer.admin.session")
    old = URLSafeTimedSerializer(OLD_KEY, salt="mailer.admin.session")
    resigned = old.dumps(current.loads(cookie))  # the same live session, the old key
    app = create_app(rotated)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=settings.base_url) as c:
            c.cookies.set("mailer_admin", cookie, path="/admin")
            assert await signed_in(c)  # signed with the current key: fine
            c.cookies.set("mailer_admin", resigned, path="/admin")
            assert not await signed_in(c)


async def test_editors_disable_ends_sessions_and_api_access(
    live: httpx.AsyncClient, settings: Settings, redis: aioredis.Redis
) -> None:
    added = mailer(settings, "editors", "add", "Ada")
    token = added.stdout.strip().splitlines()[-1]
    await editor_token(settings, "Bob")
    bearer = {"Authorization": f"Bearer {token}"}
    cookie = await login(live, token)
    assert (await live.get("/api/blasts", headers=bearer)).status_code == 200

    done = mailer(settings, "editors", "disable", "Ada")
    assert done.returncode == 0, done.stderr
    assert "disabled" in done.stdout and "1 admin session ended" in done.stdout
    assert (await live.get("/api/blasts", headers=bearer)).status_code == 403
    async with with_cookie(settings, cookie) as browser:
        assert not await signed_in(browser)
    assert (await live.post("/admin/login", data={"token": token})).status_code == 401
    assert await session_keys(redis, settings) == []
    listed = mailer(settings, "editors", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()[1:]}
    assert rows == {"Ada": "disabled", "Bob": "active"}

    assert mailer(settings, "editors", "enable", "Ada").returncode == 0
    assert (await live.get("/api/blasts", headers=bearer)).status_code == 200
    async with with_cookie(settings, cookie) as browser:
        assert not await signed_in(browser)  # enabling again does not revive old sessions
    missing = mailer(settings, "editors", "disable", "Nobody")
    assert missing.returncode == 1 and missing.stderr.strip() == "error: no editor named 'Nobody'"


async def test_editors_rotate_prints_a_new_token_and_the_old_one_stops_working(
    live: httpx.AsyncClient, settings: Settings
) -> None:
    old_token = await editor_token(settings, "Ada")
    cookie = await login(live, old_token)
    done = mailer(settings, "editors", "rotate", "Ada")
    assert done.returncode == 0, done.stderr
    new_token = done.stdout.strip().splitlines()[-1]
    assert new_token.startswith("mlr_") and len(new_token) == 47 and new_token != old_token
    assert "1 admin session ended" in done.stdout
    assert (await live.get("/api/blasts", headers=_bearer(old_token))).status_code == 403
    assert (await live.get("/api/blasts", headers=_bearer(new_token))).status_code == 200
    async with with_cookie(settings, cookie) as browser:
        assert not await signed_in(browser)
    live.cookies.clear()
    await login(live, new_token)
    assert await signed_in(live)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:1"},  # another port is another origin
        {"Referer": "https://evil.example/page"},
    ],
)
async def test_a_sign_in_posted_from_another_site_is_refused(
    app_client: httpx.AsyncClient,
    settings: Settings,
    redis: aioredis.Redis,
    headers: dict[str, str],
) -> None:
    token = await editor_token(settings)
    r = await app_client.post("/admin/login", data={"token": token}, headers=headers)
    assert r.status_code == 403 and "not sent from this site" in r.text
    assert "mailer_admin=" not in r.headers.get("set-cookie", "")
    assert await session_keys(redis, settings) == []
    # From our own page (as a browser says it) or from no browser at all: fine.
    await login(app_client, token, Origin=settings.base_url)
    app_client.cookies.clear()
    await login(app_client, token)


async def test_the_login_page_makes_browsers_name_our_origin(live: httpx.AsyncClient) -> None:
    """Under the site-wide no-referrer policy a browser posts ``Origin: null``; the login
    page asks for same-origin instead (the real-browser journey in test_admin signs in)."""
    r = await live.get("/admin/login")
    assert '<meta name="referrer" content="same-origin">' in r.text
    assert r.headers["referrer-policy"] == "no-referrer"  # the meta element overrides it
    r = await live.post("/admin/login", data={"token": "wrong"})  # shown again after a failure
    assert r.status_code == 401 and '<meta name="referrer" content="same-origin">' in r.text
