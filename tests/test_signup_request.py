"""The sign-up request's hot path answers exactly as the general machinery did.

``POST /subscribe`` reads a urlencoded body without python-multipart and serves its
202 page rendered once (bench/analysis.md, "Round two, step 3"). These tests pin what
a visitor and the database see: the same fields as Starlette's ``Request.form()``
(its parser is the oracle, on hand-picked and random bodies), the same 400s past its
limits with nothing written, the same page, headers and rows, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import httpx
import pytest
from helpers import count_subscribers, events, subscriber
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import FormParser

from mailer.config import Settings
from mailer.web.public import ACCEPTED, FORM_MAX_FIELDS, read_urlencoded

FORM = {"content-type": "application/x-www-form-urlencoded"}
UA = {"user-agent": "Reader/1.0"}


async def starlette_form(body: bytes, chunk: int) -> dict[str, str] | str:
    """What ``Request.form()`` makes of ``body`` fed in pieces of ``chunk`` bytes (or its
    400 message)."""

    async def stream() -> AsyncIterator[bytes]:
        for i in range(0, len(body), chunk):
            yield body[i : i + chunk]

    try:
        form = await FormParser(Headers(FORM), stream()).parse()
    except Exception as exc:  # noqa: BLE001 - the message is what is compared
        return str(getattr(exc, "message", exc))
    return {k: v for k, v in form.items() if isinstance(v, str)}


def ours(body: bytes) -> dict[str, str] | str:
    try:
        return read_urlencoded(body)
    except HTTPException as exc:
        assert exc.status_code == 400
        return exc.detail


BODIES = [
    b"",
    b"email=a%40example.com&name=Bench+Reader",
    b"email=a@example.com&email=b@example.com",  # the last one wins
    b"&&email=a%40example.com&&&name=&website&=x&",
    b"email",
    b"=",
    b"a=b=c&d==",
    b"name=%C3%89lodie+%E2%80%94+caf%C3%A9&email=%FF%FE%40example.com",  # bad UTF-8
    b"name=\xe9\xff&email=x%2",  # raw bytes, a cut escape
    b"na%6De=x&+sp+ace+=+&%26=%3D",
    b"email=a%40example.com;name=x",  # ';' is no separator
    b"a&" * FORM_MAX_FIELDS,
    b"a&" * FORM_MAX_FIELDS + b"b",  # one field too many
    b"x=" + b"y" * (1024 * 1024 - 1),
    b"x=" + b"y" * (1024 * 1024),  # one byte over the field limit
]


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
async def test_form_fields_are_read_as_starlette_reads_them(body: bytes) -> None:
    expected = await starlette_form(body, 1 << 30)
    assert ours(body) == expected
    assert await starlette_form(body, 7) == expected  # the oracle itself, chunked


async def test_random_forms_are_read_as_starlette_reads_them() -> None:
    rng = random.Random(16)
    alphabet = b"ab=&+%2F%C3%A9%FF;\x00 \xe9"
    for _ in range(3000):
        body = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        assert ours(body) == await starlette_form(body, 1 << 30), body


async def test_the_form_sign_up_page_and_rows(
    app_client: httpx.AsyncClient, settings: Settings
) -> None:
    pages = []
    for n in range(2):
        body = f"email=reader{n}%40example.com&name=Ada+L.&source=https://c.example/p"
        r = await app_client.post("/subscribe", content=body.encode(), headers=FORM | UA)
        assert r.status_code == 202
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert r.headers["content-length"] == str(len(r.content))
        assert "Origin" in r.headers["vary"]
        assert r.headers["x-frame-options"] == "DENY"
        assert "<h1>Check your inbox</h1>" in r.text and ACCEPTED["message"] in r.text
        pages.append(r.content)
        sub = await subscriber(settings, f"reader{n}@example.com")
        assert sub is not None and sub.status == "pending" and sub.name == "Ada L."
        assert sub.confirm_due_at is not None
        assert sub.created_at == sub.updated_at == sub.confirm_due_at
        assert sub.created_at.utcoffset() is not None
        (event,) = await events(settings, sub.id)
        assert (event.kind, event.ip, event.user_agent) == ("signup", "203.0.113.7", "Reader/1.0")
        assert event.at == sub.created_at and event.detail is not None
        assert event.detail.endswith("https://c.example/p")
    assert pages[0] == pages[1]
    # A type with parameters goes through Starlette's own parser: the same answer.
    r = await app_client.post(
        "/subscribe",
        content=b"email=reader2%40example.com",
        headers={"content-type": "Application/X-WWW-Form-Urlencoded; charset=utf-8"},
    )
    assert r.status_code == 202 and r.content == pages[0]
    assert await subscriber(settings, "reader2@example.com") is not None


async def test_form_limits_answer_400_and_write_nothing(
    app_client: httpx.AsyncClient, settings: Settings
) -> None:
    body = b"email=a%40example.com" + b"&x" * FORM_MAX_FIELDS
    r = await app_client.post("/subscribe", content=body, headers=FORM)
    assert r.status_code == 400
    assert r.json() == {
        "detail": f"Too many fields. Maximum number of fields is {FORM_MAX_FIELDS}."
    }
    r = await app_client.post("/subscribe", content=b"email=&website=x", headers=FORM)
    assert r.status_code == 422 and "required" in r.text
    r = await app_client.post(
        "/subscribe", content=b"email=a%40example.com&website=x", headers=FORM
    )
    assert r.status_code == 202  # the honeypot: the same answer, nothing recorded
    assert await count_subscribers(settings) == 0
