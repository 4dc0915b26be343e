"""Unauthenticated requests do not take SQLite's write lock (docs/security.md): junk
tokens are refused before any query, logins and scrapes only read, and admin logins
are limited per client address. With a write transaction held open elsewhere, every
one of those requests still answers at once, and a sign-up waits only for that
transaction, never for them.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import editor_token, seed_subscribers, subscriber
from sqlalchemy import event
from sqlalchemy.engine import Engine

from mailer.config import Settings
from mailer.tokens import Tokens
from mailer.web.app import create_app

JUNK_TOKENS = [
    "junk",
    "Bearer",
    "mlr_short",
    "mlr_" + "a" * 44,  # one too long
    "xyz_" + "a" * 43,  # wrong prefix
    "mlr_" + "a" * 42 + "!",  # not URL-safe base64
    "x" * 5000,
]


@pytest.fixture
def db_url(tmp_path: Path) -> str:  # SQLite's write lock is the point
    return f"sqlite+aiosqlite:///{tmp_path / 'mailer.db'}"


@pytest.fixture
def statements() -> Iterator[list[str]]:
    """Every SQL statement any engine in this process runs while the test does."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    yield seen
    event.remove(Engine, "before_cursor_execute", record)


def client_from(app: Any, ip: str, base_url: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 5000))
    return httpx.AsyncClient(transport=transport, base_url=base_url, timeout=30)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Any]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


async def test_junk_tokens_are_refused_before_any_query(
    app_client: httpx.AsyncClient, settings: Settings, statements: list[str]
) -> None:
    await editor_token(settings)
    statements.clear()
    for token in JUNK_TOKENS:
        r = await app_client.get("/api/blasts", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code in (401, 403), token[:20]
        r = await app_client.post("/admin/login", data={"token": token})
        assert r.status_code in (401, 429), token[:20]
    assert statements == []


async def test_a_flood_needs_no_write_lock_and_the_sign_up_goes_through(
    app: Any, settings: Settings, statements: list[str], tmp_path: Path
) -> None:
    await seed_subscribers(settings, confirmed=2)
    token = await editor_token(settings)
    async with client_from(app, "198.51.100.1", settings.base_url) as editor:
        assert (await editor.post("/admin/login", data={"token": token})).status_code == 303
        path = settings.database_url.split("///", 1)[1]
        holder = sqlite3.connect(path, isolation_level=None, timeout=1)
        holder.execute("BEGIN IMMEDIATE")  # a long write elsewhere: the lock is taken
        try:
            statements.clear()
            flood = [_flood_one(app, settings, i) for i in range(40)]
            # Checking a session cookie only reads: signed in, the login page sends on.
            flood.append(_expect(editor.get("/admin/login"), 303))
            confirm = Tokens(settings.signing_keys, settings.confirm_token_ttl_s).confirm(1)
            flood.append(_expect(editor.get(f"/confirm/{confirm}"), 200))
            # Every one answers while the lock is held: none of them needs it.
            await asyncio.wait_for(asyncio.gather(*flood), timeout=10)
            assert not [s for s in statements if "IMMEDIATE" in s.upper()]
            # A sign-up needs the lock: it waits for the other writer, not for the flood.
            signup = asyncio.create_task(
                editor.post("/subscribe", json={"email": "new@example.com"})
            )
            await asyncio.sleep(0.5)
            assert not signup.done()
            more = asyncio.gather(*[_flood_one(app, settings, i) for i in range(40, 60)])
            await asyncio.wait_for(more, timeout=10)
        finally:
            holder.execute("COMMIT")
            holder.close()
        r = await asyncio.wait_for(signup, timeout=10)
    assert r.status_code == 202
    assert await subscriber(settings, "new@example.com") is not None


async def _expect(request: Any, status: int, text: str = "") -> None:
    r = await request
    assert r.status_code == status, (r.request.url, r.status_code)
    assert text in r.text


async def _flood_one(app: Any, settings: Settings, i: int) -> None:
    """One stranger's request: a junk or unknown token, a login, a scrape, a probe."""
    async with client_from(app, f"192.0.2.{i % 250 + 1}", settings.base_url) as stranger:
        kind = i % 5
        if kind == 0:
            junk = JUNK_TOKENS[i % len(JUNK_TOKENS)]
            r = await stranger.get("/api/blasts", headers={"Authorization": f"Bearer {junk}"})
            assert r.status_code in (401, 403)
        elif kind == 1:  # well-formed but unknown: one read-only query
            unknown = "mlr_" + f"{i:043d}"
            r = await stranger.get("/api/blasts", headers={"Authorization": f"Bearer {unknown}"})
            assert r.status_code == 403
        elif kind == 2:
            r = await stranger.post("/admin/login", data={"token": "mlr_" + "W" * 43})
            assert r.status_code == 401 and "not valid" in r.text
        elif kind == 3:
            r = await stranger.get("/metrics")
            assert r.status_code == 200 and 'mailer_subscribers{status="confirmed"} 2.0' in r.text
        else:
            r = await stranger.get("/readyz")
            assert r.status_code == 200 and r.json()["database"] == "ok"


async def test_admin_login_is_limited_per_client_address(app: Any, settings: Settings) -> None:
    token = await editor_token(settings)
    if time.time() % 300 > 280:  # the attempts must share one window
        await asyncio.sleep(300 - time.time() % 300 + 0.1)
    async with client_from(app, "203.0.113.50", settings.base_url) as guesser:
        for _ in range(10):
            r = await guesser.post("/admin/login", data={"token": "mlr_" + "G" * 43})
            assert r.status_code == 401
        r = await guesser.post("/admin/login", data={"token": "mlr_" + "G" * 43})
        assert r.status_code == 429 and "Too many sign-in attempts" in r.text
        assert 0 < int(r.headers["retry-after"]) <= 300
        # Over the limit nothing is looked up, not even the right token.
        r = await guesser.post("/admin/login", data={"token": token})
        assert r.status_code == 429 and "mailer_admin=" not in r.headers.get("set-cookie", "")
    # The same /64 is the same network; another address is not held back.
    async with client_from(app, "2001:db8::1", settings.base_url) as v6:
        for _ in range(10):
            await v6.post("/admin/login", data={"token": "wrong"})
    async with client_from(app, "2001:db8::2", settings.base_url) as same_net:
        assert (await same_net.post("/admin/login", data={"token": token})).status_code == 429
    async with client_from(app, "203.0.113.51", settings.base_url) as editor:
        for _ in range(12):  # signing in does not use up the allowance
            assert (await editor.post("/admin/login", data={"token": token})).status_code == 303
