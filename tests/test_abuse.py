"""Abuse: sign-up floods (one IP, many IPs aimed at one victim), trusted proxies and
X-Forwarded-For, secret key rotation, and no secret in the logs of a full run.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword
from helpers import (
    editor_token,
    events,
    find_link,
    queue_settled,
    settings_env,
    subscriber,
    text_body,
    wait_until,
    within_one_limiter_window,
)
from pydantic import SecretStr
from smtpserver import Recorder, SmtpServer, _Controller, free_port
from starlette.requests import Request

from mailer.config import LogFormat, Settings, SettingsError, load_settings
from mailer.tokens import Tokens
from mailer.web.app import create_app
from mailer.web.context import client_ip, rate_limit_key

PROXY = "203.0.113.7"  # the address app_client connects from
VICTIM = "victim@example.com"
OLD_KEY = "old-secret-key-0123456789abcdef-old"
NEW_KEY = "new-secret-key-fedcba9876543210-new"
PRODUCTION = {"secret_key": NEW_KEY, "base_url": "https://updates.example.org"}


def visitors(n: int) -> list[str]:
    return [f"198.51.100.{i + 1}" for i in range(n)]


# Floods -------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"subscribe_limit_per_minute": 10}])
async def test_flood_from_one_ip_is_limited_and_mails_the_victim_once(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer, start_worker: Any
) -> None:
    """No trusted proxy: a forged X-Forwarded-For changes nothing, the peer is the client."""
    await within_one_limiter_window()
    await start_worker()
    statuses = []
    for i, ip in enumerate(visitors(200)):
        r = await app_client.post(
            "/subscribe",
            json={"email": VICTIM if i % 2 else f"other{i}@example.com"},
            headers={"x-forwarded-for": ip},
        )
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert "try again" in r.json()["detail"]
    assert statuses.count(202) == 10 and statuses.count(429) == 190, statuses
    await queue_settled(settings)  # every confirmation job queued has been run
    assert len(smtp.recorder.to(VICTIM)) == 1
    assert len(smtp.messages) == 6  # and the 5 other addresses accepted within the limit
    sub = await subscriber(settings, VICTIM)
    assert sub is not None
    assert {e.ip for e in await events(settings, sub.id) if e.kind.startswith("signup")} == {PROXY}


@pytest.mark.parametrize(
    "settings_overrides",
    [
        {"trusted_proxies": [PROXY], "subscribe_limit_per_minute": 10},
        {"trusted_proxies": ["10.0.0.0/8", "203.0.113.0/24"], "subscribe_limit_per_minute": 10},
    ],
    ids=["exact", "cidr"],
)
async def test_flood_from_many_ips_mails_the_victim_once(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer, start_worker: Any
) -> None:
    """200 sign-ups of one address from 50 addresses behind our proxy, within a minute:
    every answer the same 202 (no enumeration, each IP is within its limit), one mail."""
    await within_one_limiter_window()
    await start_worker()
    ips = visitors(50)

    async def sign_up(i: int) -> int:
        r = await app_client.post(
            "/subscribe",
            json={"email": VICTIM, "name": f"Bot {i}"},
            headers={"x-forwarded-for": f"192.0.2.66, {ips[i % 50]}"},  # left part: forged
        )
        return r.status_code

    statuses: list[int] = []
    for start in range(0, 200, 25):  # 25 at a time, racing each other
        statuses += await asyncio.gather(*(sign_up(i) for i in range(start, start + 25)))
    assert statuses == [202] * 200
    await queue_settled(settings)
    assert len(smtp.recorder.to(VICTIM)) == 1 and len(smtp.messages) == 1
    sub = await subscriber(settings, VICTIM)
    assert sub is not None and sub.status == "pending"
    seen = await events(settings, sub.id)
    assert len(seen) == 200 + 1  # 200 sign-ups and the one confirmation sent
    assert {e.ip for e in seen if e.kind.startswith("signup")} == set(ips)
    # The per-IP limit follows the forwarded address: one of them keeps going, alone.
    statuses = []
    for _ in range(12):
        r = await app_client.post(
            "/subscribe", json={"email": VICTIM}, headers={"x-forwarded-for": ips[0]}
        )
        statuses.append(r.status_code)
    assert statuses.count(429) == 12 - (10 - 4), statuses  # 4 used in the flood above
    r = await app_client.post(
        "/subscribe", json={"email": VICTIM}, headers={"x-forwarded-for": ips[1]}
    )
    assert r.status_code == 202


@pytest.mark.parametrize(
    "settings_overrides", [{"trusted_proxies": [PROXY], "subscribe_limit_per_minute": 5}]
)
async def test_forged_hops_and_ipv6_rotation_do_not_escape_the_limit(
    app_client: httpx.AsyncClient, settings: Settings
) -> None:
    await within_one_limiter_window()
    forged = [
        await app_client.post(
            "/subscribe",
            json={"email": f"f{i}@example.com"},
            headers={"x-forwarded-for": f"10.9.9.{i}, 198.51.100.77"},
        )
        for i in range(8)
    ]
    assert [r.status_code for r in forged] == [202] * 5 + [429] * 3
    rotated = [
        await app_client.post(
            "/subscribe",
            json={"email": f"v6{i}@example.com"},
            headers={"x-forwarded-for": f"2001:db8:1:2::{i + 1:x}"},
        )
        for i in range(8)
    ]
    assert [r.status_code for r in rotated] == [202] * 5 + [429] * 3
    garbage = [
        await app_client.post(
            "/subscribe",
            json={"email": f"g{i}@example.com"},
            headers={"x-forwarded-for": f"not-an-ip-{i}"},
        )
        for i in range(8)
    ]  # a hop that is no address ends the walk at the proxy, so all count as the proxy
    assert [r.status_code for r in garbage] == [202] * 5 + [429] * 3


def request_from(peer: str, *forwarded: str) -> Request:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return Request({"type": "http", "headers": headers, "client": (peer, 5555)})


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "expected"),
    [
        ([], "203.0.113.7", ["198.51.100.1"], "203.0.113.7"),
        (["203.0.113.8"], "203.0.113.7", ["198.51.100.1"], "203.0.113.7"),
        (["203.0.113.7"], "203.0.113.7", ["198.51.100.1"], "198.51.100.1"),
        (["203.0.113.7"], "203.0.113.7", [], "203.0.113.7"),
        (["10.0.0.0/8"], "10.20.30.40", ["198.51.100.1"], "198.51.100.1"),
        (["10.0.0.0/8"], "11.0.0.1", ["198.51.100.1"], "11.0.0.1"),
        (["10.0.0.0/8"], "10.0.0.1", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
        (["10.0.0.0/8"], "10.0.0.1", ["198.51.100.1, 10.0.0.2, 10.0.0.3"], "198.51.100.1"),
        (["10.0.0.0/8"], "10.0.0.1", ["10.0.0.2, 10.0.0.3"], "10.0.0.2"),
        (["10.0.0.0/8"], "10.0.0.1", ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),
        (["10.0.0.0/8"], "10.0.0.1", ["198.51.100.1, <script>"], "10.0.0.1"),
        (["10.0.0.0/8"], "10.0.0.1", ["198.51.100.1:4711"], "198.51.100.1"),
        (["10.0.0.0/8"], "10.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
        (["10.0.0.0/8"], "::ffff:10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        (["2001:db8::/32"], "2001:db8::5", ["2001:db9::1"], "2001:db9::1"),
        (["2001:db8::/32"], "2001:db8::5", ["unknown"], "2001:db8::5"),
        (["0.0.0.0/0"], "10.0.0.1", ["1.2.3.4, 5.6.7.8"], "1.2.3.4"),
    ],
)
def test_client_ip(trusted: list[str], peer: str, forwarded: list[str], expected: str) -> None:
    settings = load_settings(trusted_proxies=",".join(trusted), **PRODUCTION)
    assert client_ip(request_from(peer, *forwarded), settings.trusted_networks) == expected


def test_rate_limit_counts_ipv6_per_64() -> None:
    assert rate_limit_key("2001:db8:1:2::1") == rate_limit_key("2001:db8:1:2:ffff::9")
    assert rate_limit_key("2001:db8:1:3::1") != rate_limit_key("2001:db8:1:2::1")
    assert rate_limit_key("198.51.100.1") == "198.51.100.1"


def test_trusted_proxies_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILER_TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.7 ,2001:db8::/32")
    settings = load_settings(**PRODUCTION)
    assert settings.trusted_proxies == ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]
    assert [str(n) for n in settings.trusted_networks] == [
        "10.0.0.0/8",
        "192.0.2.7/32",
        "2001:db8::/32",
    ]
    assert ipaddress.ip_address("10.255.0.1") in settings.trusted_networks[0]
    for bad in ("proxy.internal", "10.0.0.0/33", "192.0.2.300"):
        monkeypatch.setenv("MAILER_TRUSTED_PROXIES", bad)
        with pytest.raises(SettingsError, match=rf"MAILER_TRUSTED_PROXIES: '{re.escape(bad)}'"):
            load_settings(**PRODUCTION)


# Secret key rotation --------------------------------------------------------------------------


def keyed(settings: Settings, current: str, *old: str) -> Settings:
    return settings.model_copy(
        update={"secret_key": SecretStr(current), "old_secret_keys": [SecretStr(k) for k in old]}
    )


@asynccontextmanager
async def client_for(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=(PROXY, 5000))
        async with httpx.AsyncClient(transport=transport, base_url=settings.base_url) as client:
            yield client


async def test_secret_key_rotation(settings: Settings, smtp: SmtpServer, start_worker: Any) -> None:
    before = keyed(settings, OLD_KEY)
    after = keyed(settings, NEW_KEY, OLD_KEY)
    dropped = keyed(settings, NEW_KEY)
    token = await editor_token(settings)

    # Under the old key: a sign-up, its confirmation link, an admin session, a bounce tag.
    old_worker = await start_worker(settings=before)
    async with client_for(before) as client:
        assert (await client.post("/subscribe", json={"email": "old@example.com"})).status_code
        await wait_until(lambda: smtp.recorder.to("old@example.com"))
        old_confirm = urlsplit(
            find_link(text_body(smtp.recorder.to("old@example.com")[0].message), "confirm")
        ).path
        r = await client.post("/admin/login", data={"token": token})
        old_session = client.cookies["mailer_admin"]
    sub = await subscriber(settings, "old@example.com")
    assert sub is not None
    old_tokens = Tokens(before.signing_keys, before.confirm_token_ttl_s)
    old_unsubscribe = f"/unsubscribe/{old_tokens.unsubscribe(sub.id)}"
    old_bounce = old_tokens.bounce_tag(sub.id)

    # Rotated: every old link still works, but no admin session: those are signed with
    # the current key alone, so a key kept for old links cannot open one (docs/security.md).
    async with client_for(after) as client:
        assert (await client.get(old_confirm)).status_code == 200
        assert (await client.post(old_confirm)).status_code == 200
        assert (await subscriber(settings, "old@example.com")).status == "confirmed"  # type: ignore[union-attr]
        client.cookies.set("mailer_admin", old_session, path="/admin")
        r = await client.get("/admin/statements")
        assert r.status_code == 303 and r.headers["location"] == "/admin/login"
        assert (await client.get(old_unsubscribe)).status_code == 200
    rotated = Tokens(after.signing_keys, after.confirm_token_ttl_s)
    assert rotated.read_bounce_tag(old_bounce) == sub.id
    # ... and everything new is signed with the new key alone.
    only_new = Tokens([NEW_KEY], settings.confirm_token_ttl_s)
    only_old = Tokens([OLD_KEY], settings.confirm_token_ttl_s)
    fresh_unsubscribe = rotated.unsubscribe(sub.id)
    assert only_new.read_unsubscribe(fresh_unsubscribe) == sub.id
    with pytest.raises(Exception, match="not valid"):
        only_old.read_unsubscribe(fresh_unsubscribe)
    assert only_new.read_bounce_tag(rotated.bounce_tag(sub.id)) == sub.id
    smtp.recorder.clear()
    await old_worker.close()  # every process restarts with the new settings
    await start_worker(settings=after)
    async with client_for(after) as client:
        assert (await client.post("/subscribe", json={"email": "new@example.com"})).status_code
        await wait_until(lambda: smtp.recorder.to("new@example.com"))
    link = find_link(text_body(smtp.recorder.to("new@example.com")[0].message), "confirm")
    fresh_confirm = link.rsplit("/", 1)[1]
    new_sub = await subscriber(settings, "new@example.com")
    assert new_sub is not None
    assert only_new.read_confirm(fresh_confirm).subscriber_id == new_sub.id
    with pytest.raises(Exception, match="not valid"):
        only_old.read_confirm(fresh_confirm)

    # Once the old key is dropped, the old links stop working, with the usual 400 page.
    async with client_for(dropped) as client:
        r = await client.get(old_unsubscribe)
        assert r.status_code == 400 and "This link does not work" in r.text
        client.cookies.set("mailer_admin", old_session, path="/admin")
        assert (await client.get("/admin/statements")).status_code == 303  # back to login
        assert (await client.get(f"/unsubscribe/{fresh_unsubscribe}")).status_code == 200


# No secret in the logs of a full run -------------------------------------------------------------

SMTP_USER = "mailer-relay"
SMTP_PASSWORD = "smtp-pa55word-Zq8vX2"  # noqa: S105


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
class TestLogs:
    @pytest.fixture
    def db_url(self, tmp_path: Path) -> str:  # one database is enough: this is about logs
        return f"sqlite+aiosqlite:///{tmp_path / 'mailer.db'}"

    @pytest.fixture
    def relay(self) -> Iterator[tuple[int, Recorder]]:
        """An SMTP relay that insists on AUTH, so the password is really used."""

        def authenticator(*args: Any) -> AuthResult:
            data = args[-1]
            ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
                SMTP_USER.encode(),
                SMTP_PASSWORD.encode(),
            )
            return AuthResult(success=ok)

        recorder = Recorder()
        controller = _Controller(
            recorder,
            hostname="127.0.0.1",
            port=free_port(),
            ready_timeout=10,
            decode_data=False,
            auth_require_tls=False,  # loopback; TLS to relays is tested in test_engine
            auth_required=True,
            authenticator=authenticator,
        )
        controller.start()
        assert controller.server is not None
        yield controller.server.sockets[0].getsockname()[1], recorder
        controller.stop()

    async def test_logs_of_a_full_run_hold_no_token_and_no_password(
        self, settings: Settings, relay: tuple[int, Recorder], web_port: int, tmp_path: Path
    ) -> None:
        port, recorder = relay
        run = settings.model_copy(
            update={
                "smtp_port": port,
                "smtp_username": SMTP_USER,
                "smtp_password": SecretStr(SMTP_PASSWORD),
                "log_format": LogFormat.json,
                "subscribe_limit_per_minute": 3,
            }
        )
        env = settings_env(run)
        token = await editor_token(run)
        mailer = str(Path(sys.executable).parent / "mailer")
        logs = {name: tmp_path / f"{name}.log" for name in ("web", "worker")}
        procs = []
        for name, args in (("web", ["serve", "--port", str(web_port)]), ("worker", ["worker"])):
            with logs[name].open("wb") as out:
                procs.append(subprocess.Popen([mailer, *args], env=env, stdout=out, stderr=out))
        secrets: dict[str, str] = {
            "secret key": run.signing_keys[-1],
            "SMTP password": SMTP_PASSWORD,
            "editor token": token,
        }
        try:
            secrets |= await self._full_run(run, token, recorder)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        text = {name: path.read_text() for name, path in logs.items()}
        for name, log in text.items():
            lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
            assert lines, f"{name} wrote no JSON log lines:\n{log[:2000]}"
            for what, value in secrets.items():
                assert value not in log, f"{what} in the {name} log"
        # The logs did see the run (so the check above looked at something real).
        assert "failed login" in text["web"] and "erased by editor" in text["web"]
        assert re.search(r"blast \d+ done", text["worker"]), text["worker"][-2000:]

    async def _full_run(self, run: Settings, token: str, relay: Recorder) -> dict[str, str]:
        """Everything a day brings: sign-ups, floods, confirm, admin, blast, bounces of
        links, unsubscribe, erase. Returns the secrets handed out on the way."""
        seen: dict[str, str] = {}
        bearer = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=run.base_url, timeout=10) as http:

            async def ready() -> bool:
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(ready, timeout=60)  # a process start-up; slow on a busy machine
            r = await http.post("/subscribe", data={"email": "ada@example.com", "name": "Ada"})
            assert r.status_code == 202
            for i in range(4):  # over the per-IP limit
                await http.post("/subscribe", data={"email": f"flood{i}@example.com"})
            await wait_until(lambda: relay.to("ada@example.com"), timeout=30)
            confirm = find_link(text_body(relay.to("ada@example.com")[0].message), "confirm")
            seen["confirm token"] = confirm.rsplit("/", 1)[1]
            assert (await http.post(urlsplit(confirm).path)).status_code == 200
            wrong = "mlr_" + "W" * 43
            seen["attempted token"] = wrong
            assert (await http.post("/admin/login", data={"token": wrong})).status_code == 401
            r = await http.get("/api/blasts", headers={"Authorization": f"Bearer {wrong}"})
            assert r.status_code == 403
            r = await http.post("/admin/login", data={"token": token})
            seen["admin session"] = http.cookies["mailer_admin"]
            csrf = re.search(
                r'name="csrf_token" value="([^"]+)"', (await http.get("/admin/statements/new")).text
            )
            assert csrf
            seen["CSRF token"] = csrf.group(1)
            r = await http.post(
                "/api/statements", json={"title": "News", "body_markdown": "Hi."}, headers=bearer
            )
            sid = r.json()["id"]
            r = await http.post(
                f"/api/statements/{sid}/test", json={"to": ["ed@example.com"]}, headers=bearer
            )
            assert r.json()["results"] == {"ed@example.com": "sent"}
            r = await http.post("/api/blasts", json={"statement_id": sid}, headers=bearer)
            bid = r.json()["id"]

            async def done() -> bool:
                p = (await http.get(f"/api/blasts/{bid}", headers=bearer)).json()
                return bool(p["status"] == "done")

            await wait_until(done, timeout=30)
            mail = [m for m in relay.to("ada@example.com") if "News" in str(m.message["Subject"])]
            unsubscribe = find_link(text_body(mail[0].message), "unsubscribe")
            seen["unsubscribe token"] = unsubscribe.rsplit("/", 1)[1]
            await http.get(f"/confirm/{seen['unsubscribe token']}")  # a wrong-purpose link
            await http.post(f"/unsubscribe/{seen['confirm token']}x")
            r = await http.post(
                urlsplit(unsubscribe).path,
                content=b"List-Unsubscribe=One-Click",
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
            assert r.status_code == 200
            ada = await subscriber(run, "ada@example.com")
            assert ada is not None
            r = await http.delete(f"/api/subscribers/{ada.id}", headers=bearer)
            assert r.status_code == 204
        return seen
