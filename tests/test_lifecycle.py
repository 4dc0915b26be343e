"""The subscriber lifecycle end to end: uvicorn, SMTP, Redis, SQLite and PostgreSQL."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from helpers import (
    events,
    find_link,
    queue_settled,
    subscriber,
    table_counts,
    text_body,
    wait_until,
    within_one_limiter_window,
)
from smtpserver import SmtpServer

from mailer.config import Settings
from mailer.tokens import Tokens


async def sign_up_and_get_confirm_link(
    live: httpx.AsyncClient, smtp: SmtpServer, email: str, **headers: str
) -> str:
    before = len(smtp.messages)
    r = await live.post("/subscribe", data={"email": email, "name": "Ada"}, headers=headers)
    assert r.status_code == 202, r.text
    await wait_until(lambda: len(smtp.messages) > before)
    mail = smtp.recorder.to(email)[-1]
    return find_link(text_body(mail.message), "confirm")


async def test_sign_up_confirm_through_uvicorn(
    live: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    await start_worker()
    ua = {"user-agent": "LifecycleTest/1.0"}
    link = await sign_up_and_get_confirm_link(live, smtp, "ada@example.com", **ua)
    mail = smtp.recorder.to("ada@example.com")[0].message
    assert "confirm" in str(mail["Subject"]).lower()
    assert mail.get_body(preferencelist=("html",)) is not None

    path = urlsplit(link).path
    page = await live.get(path)  # what a mail scanner does
    assert page.status_code == 200
    assert "<button" in page.text and "Confirm" in page.text
    sub = await subscriber(settings, "ada@example.com")
    assert sub is not None and sub.status == "pending"

    done = await live.post(path, headers=ua)
    assert done.status_code == 200
    assert "subscribed" in done.text.lower()
    sub = await subscriber(settings, "ada@example.com")
    assert sub is not None and sub.status == "confirmed"
    assert sub.consent_ip == "127.0.0.1"
    assert sub.consent_user_agent == "LifecycleTest/1.0"
    confirmed = [e for e in await events(settings, sub.id) if e.kind == "confirmed"]
    assert len(confirmed) == 1
    assert confirmed[0].ip == "127.0.0.1" and confirmed[0].user_agent == "LifecycleTest/1.0"

    again = await live.post(path)  # idempotent
    assert again.status_code == 200
    assert len([e for e in await events(settings, sub.id) if e.kind == "confirmed"]) == 1


async def _confirmed(live: httpx.AsyncClient, smtp: SmtpServer, email: str) -> None:
    link = await sign_up_and_get_confirm_link(live, smtp, email)
    assert (await live.post(urlsplit(link).path)).status_code == 200


def _unsub_path(settings: Settings, sub_id: int) -> str:
    token = Tokens(settings.signing_keys, settings.confirm_token_ttl_s).unsubscribe(sub_id)
    return f"/unsubscribe/{token}"


@pytest.mark.parametrize("how", ["page", "one-click-urlencoded", "one-click-multipart"])
async def test_unsubscribe(
    how: str, live: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    await start_worker()
    await _confirmed(live, smtp, "bob@example.com")
    sub = await subscriber(settings, "bob@example.com")
    assert sub is not None
    path = _unsub_path(settings, sub.id)

    page = await live.get(path)
    assert page.status_code == 200 and "<button" in page.text
    assert (await subscriber(settings, "bob@example.com")).status == "confirmed"  # type: ignore[union-attr]

    for _ in range(2):  # repeating is harmless
        if how == "page":
            r = await live.post(path, data={})
        elif how == "one-click-urlencoded":
            r = await live.post(
                path,
                content=b"List-Unsubscribe=One-Click",
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
        else:
            r = await live.post(path, files={"List-Unsubscribe": (None, "One-Click")})
            assert r.request.headers["content-type"].startswith("multipart/form-data")
        assert r.status_code == 200, r.text
        assert "location" not in r.headers
        assert "unsubscribed" in r.text.lower()
    sub = await subscriber(settings, "bob@example.com")
    assert sub is not None and sub.status == "unsubscribed"
    kinds = [e.kind for e in await events(settings, sub.id)]
    assert kinds.count("unsubscribed") == 1


async def test_bad_tokens_get_a_400_page_and_change_nothing(
    live: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    await start_worker()
    link = await sign_up_and_get_confirm_link(live, smtp, "eve@example.com")
    token = urlsplit(link).path.rsplit("/", 1)[1]
    sub = await subscriber(settings, "eve@example.com")
    assert sub is not None
    tokens = Tokens(settings.signing_keys, settings.confirm_token_ttl_s)
    expired = tokens.confirm(sub.id, now=time.time() - settings.confirm_token_ttl_s - 60)
    other_key = Tokens(["another-secret-key-000000"], 3600)
    cases = {
        "tampered confirm": f"/confirm/{token[:-2]}{'AA' if token[-2:] != 'AA' else 'BB'}",
        "expired confirm": f"/confirm/{expired}",
        "unknown subscriber": f"/confirm/{tokens.confirm(999_999)}",
        "garbage": "/confirm/not-a-token",
        "foreign key": f"/confirm/{other_key.confirm(sub.id)}",
        "unsubscribe token used to confirm": f"/confirm/{tokens.unsubscribe(sub.id)}",
        "confirm token used to unsubscribe": f"/unsubscribe/{token}",
        "tampered unsubscribe": f"/unsubscribe/{tokens.unsubscribe(sub.id)}x",
        "unknown unsubscribe": f"/unsubscribe/{tokens.unsubscribe(424242)}",
    }
    before = await table_counts(settings)
    for name, path in cases.items():
        for method in ("GET", "POST"):
            r = await live.request(method, path)
            assert r.status_code == 400, (name, method, r.status_code)
            assert "<h1>This link does not work</h1>" in r.text, name
            assert "/subscribe" in r.text  # a way to sign up again
    assert "expired" in (await live.get(cases["expired confirm"])).text
    assert await table_counts(settings) == before
    assert (await subscriber(settings, "eve@example.com")).status == "pending"  # type: ignore[union-attr]


async def test_no_enumeration_and_resend_cooldown(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    await start_worker()
    # pending, confirmed, unsubscribed and new addresses must be indistinguishable
    r = await app_client.post("/subscribe", json={"email": "pending@example.com"})
    await wait_until(lambda: smtp.recorder.to("pending@example.com"))
    link = find_link(text_body(smtp.recorder.to("pending@example.com")[0].message), "confirm")
    r = await app_client.post("/subscribe", json={"email": "confirmed@example.com"})
    await wait_until(lambda: smtp.recorder.to("confirmed@example.com"))
    clink = find_link(text_body(smtp.recorder.to("confirmed@example.com")[0].message), "confirm")
    assert (await app_client.post(urlsplit(clink).path)).status_code == 200
    await app_client.post("/subscribe", json={"email": "gone@example.com"})
    await wait_until(lambda: smtp.recorder.to("gone@example.com"))
    gone = await subscriber(settings, "gone@example.com")
    assert gone is not None
    assert (await app_client.post(_unsub_path(settings, gone.id))).status_code == 200
    assert link

    for kind in ("json", "form"):
        bodies = set()
        for email in (
            "new@example.com",
            "pending@example.com",
            "confirmed@example.com",
            "gone@example.com",
        ):
            if kind == "json":
                r = await app_client.post("/subscribe", json={"email": email})
            else:
                r = await app_client.post("/subscribe", data={"email": email})
            assert r.status_code == 202
            bodies.add(r.content)
        assert len(bodies) == 1, bodies

    # Five sign-ups of one address within a minute: exactly one confirmation mail.
    for _ in range(5):
        r = await app_client.post("/subscribe", json={"email": "once@example.com"})
        assert r.status_code == 202
    await queue_settled(settings)
    assert len(smtp.recorder.to("once@example.com")) == 1
    assert len(smtp.recorder.to("confirmed@example.com")) == 1  # confirmed: no new mail


@pytest.mark.parametrize("settings_overrides", [{"subscribe_limit_per_minute": 5}])
async def test_per_ip_limit(app_client: httpx.AsyncClient, settings: Settings) -> None:
    await within_one_limiter_window()
    limit = settings.subscribe_limit_per_minute
    statuses = []
    for i in range(limit + 3):
        r = await app_client.post("/subscribe", json={"email": f"user{i}@example.com"})
        statuses.append(r.status_code)
    assert 429 in statuses
    first_429 = statuses.index(429)
    assert all(s == 202 for s in statuses[:first_429])
    assert first_429 <= limit
    r = await app_client.post("/subscribe", json={"email": "late@example.com"})
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) > 0
    assert "try again" in r.json()["detail"]


INVALID = [
    ("", "required"),
    ("plainaddress", "@"),
    ("@example.com", ""),
    ("user@", ""),
    ("user@@example.com", ""),
    ("user name@example.com", "spaces"),
    (" user@exa mple.com", "spaces"),
    ("user@example.com\r\nBcc: victim@example.com", "control"),
    ("user@example.com\n", None),
    ("user\x00@example.com", "control"),
    ("a" * 300 + "@example.com", "longer than"),
    ("user@" + "b" * 250 + ".com", "longer than"),
    ("example.com", "@"),
    ("user@localhost", ""),
    ("user@example", ""),
    ("user@-example.com", ""),
    ("user@example..com", ""),
    ("us..er@example.com", ""),
    (".user@example.com", ""),
    ("user@exa_mple.com", ""),
    ("user\u202e@example.com", "control"),
    ("us\u200ber@example.com", "control"),
    ("юзер@example.com", ""),
    ("user@[127.0.0.1]", ""),
    ("<user@example.com>", ""),
    ('"user"@example.com,other@example.com', ""),
]


async def test_invalid_addresses_get_422_and_write_nothing(
    app_client: httpx.AsyncClient, settings: Settings, redis: Any
) -> None:
    before = await table_counts(settings)
    for i, (address, fragment) in enumerate(INVALID):
        await redis.delete(
            *[k async for k in redis.scan_iter(f"{settings.queue_name}:ratelimit*")] or ["-"]
        )
        r = await app_client.post("/subscribe", json={"email": address}, headers={"x-case": str(i)})
        if address == "user@example.com\n":
            # surrounding whitespace is trimmed: this one is valid
            assert r.status_code == 202
            continue
        assert r.status_code == 422, (address, r.status_code, r.text)
        body = r.json()
        assert body["field"] == "email"
        assert body["detail"].startswith("email: ")
        if fragment:
            assert fragment in body["detail"], (address, body["detail"])
    r = await app_client.post("/subscribe", data={"email": "not an address"})
    assert r.status_code == 422 and "spaces" in r.text and "<form" in r.text
    after = await table_counts(settings)
    after["subscribers"] -= 1  # the one valid address above
    after["subscriber_events"] -= 1
    assert after == before


async def test_honeypot_drops_bots_silently(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer, start_worker: Any
) -> None:
    await start_worker()
    r = await app_client.post("/subscribe", data={"email": "bot@example.com", "website": "x"})
    assert r.status_code == 202
    await queue_settled(settings)
    assert await subscriber(settings, "bot@example.com") is None
    assert smtp.recorder.to("bot@example.com") == []


async def test_confirmation_retried_after_451_then_delivered_once(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    smtp.recorder.plan = lambda rcpt, attempt: "451 4.3.0 greylisted" if attempt <= 2 else None
    await start_worker()
    r = await app_client.post("/subscribe", json={"email": "grey@example.com"})
    assert r.status_code == 202
    await queue_settled(settings)  # the retries too: any duplicate has arrived by now
    assert len(smtp.recorder.to("grey@example.com")) == 1
    assert smtp.recorder.attempts["grey@example.com"] == 3
    sub = await subscriber(settings, "grey@example.com")
    assert sub is not None and sub.status == "pending"


async def test_confirmation_550_bounces_and_worker_keeps_running(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    smtp.recorder.plan = lambda rcpt, attempt: (
        "550 5.1.1 no such user" if rcpt.startswith("nobody") else None
    )
    await start_worker()
    assert (
        await app_client.post("/subscribe", json={"email": "nobody@example.com"})
    ).status_code == 202

    async def bounced() -> bool:
        sub = await subscriber(settings, "nobody@example.com")
        return sub is not None and sub.status == "bounced"

    await wait_until(bounced)
    assert smtp.recorder.to("nobody@example.com") == []
    sub = await subscriber(settings, "nobody@example.com")
    assert sub is not None
    assert any(
        e.kind == "bounced" and "5.1.1" in (e.detail or "") for e in await events(settings, sub.id)
    )
    # the same worker still serves the next job
    assert (
        await app_client.post("/subscribe", json={"email": "next@example.com"})
    ).status_code == 202
    await wait_until(lambda: smtp.recorder.to("next@example.com"))
