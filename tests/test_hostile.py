"""Hostile input, on SQLite and PostgreSQL: a table of attacks across the endpoints, each
refused with a clear status and message and nothing written; size limits (also for a
chunked body without Content-Length); header and SMTP command injection checked on the
raw bytes the SMTP server received; security headers, cookies, escaping, redirects.
"""

from __future__ import annotations

import asyncio
import csv
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from helpers import (
    editor_token,
    queue_settled,
    seed_subscribers,
    subscriber,
    table_counts,
    wait_until,
)
from smtpserver import SmtpServer
from sqlalchemy import text

from mailer.config import Settings
from mailer.db import make_engine
from mailer.importer import MAX_FILE_BYTES, ImportFileError, ImportOptions, check_file, import_csv
from mailer.render import clean_header_text
from mailer.statements import MAX_BODY, MAX_TITLE
from mailer.tokens import Tokens

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
BIG = str(2**64)


async def execute(settings: Settings, statement: str, **params: Any) -> None:
    """A write behind the app's back: rows planted as an old version or a hand edit might."""
    engine = make_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(statement), params)
    finally:
        await engine.dispose()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def admin_login(client: httpx.AsyncClient, token: str) -> str:
    """Sign the client in to /admin; returns a CSRF token for its forms."""
    r = await client.post("/admin/login", data={"token": token})
    assert r.status_code == 303, r.text
    page = await client.get("/admin/statements/new")
    match = CSRF.search(page.text)
    assert match
    return match.group(1)


@dataclass
class Attack:
    label: str
    method: str
    path: str
    status: int
    says: str  # a fragment of the message that tells the sender what is wrong
    who: str = "editor"  # editor (bearer token), admin (session + CSRF), public, nobody, stranger
    json: Any = None
    data: dict[str, str] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def attacks(sid: int) -> list[Attack]:
    crlf_bcc = "\r\nBcc: victim@example.com"
    smtp_inject = "a@example.com>\r\nRCPT TO:<evil@example.com"
    statement = {"title": "Fine", "body_markdown": "Fine."}
    form = {"content-type": "application/x-www-form-urlencoded"}
    as_json = {"content-type": "application/json"}
    return [
        # The sign-up form
        Attack("empty address", "POST", "/subscribe", 422, "required", "public",
               json={"email": ""}),
        Attack("CRLF Bcc in address", "POST", "/subscribe", 422, "control", "public",
               json={"email": "a@example.com" + crlf_bcc}),
        Attack("SMTP command in address", "POST", "/subscribe", 422, "email:", "public",
               json={"email": smtp_inject}),
        Attack("address over 254", "POST", "/subscribe", 422, "longer than 254", "public",
               json={"email": "a" * 60 + "@" + "b" * 200 + ".com"}),
        Attack("CRLF Bcc in name", "POST", "/subscribe", 422, "line breaks", "public",
               json={"email": "a@example.com", "name": "Eve" + crlf_bcc}),
        Attack("NUL in name", "POST", "/subscribe", 422, "control", "public",
               json={"email": "a@example.com", "name": "Eve\x00"}),
        Attack("U+2028 in name", "POST", "/subscribe", 422, "control", "public",
               json={"email": "a@example.com", "name": "Eve\u2028Bcc: x@example.com"}),
        Attack("name over 200", "POST", "/subscribe", 422, "longer than 200", "public",
               json={"email": "a@example.com", "name": "n" * 201}),
        Attack("name not text", "POST", "/subscribe", 422, "must be text", "public",
               json={"email": "a@example.com", "name": {"$ne": 1}}),
        Attack("JSON array", "POST", "/subscribe", 422, "JSON object", "public",
               json=["a@example.com"]),
        Attack("broken JSON", "POST", "/subscribe", 422, "not valid JSON", "public",
               content=b'{"email": "a@example.com"', headers=as_json),
        Attack("JSON nested 100,000 deep", "POST", "/subscribe", 422, "not valid JSON", "public",
               content=b"[" * 100_000, headers=as_json),
        Attack("JSON not UTF-8", "POST", "/subscribe", 422, "not valid JSON", "public",
               content=b'{"email": "\xff\xfe@example.com"}', headers=as_json),
        Attack("form field not UTF-8", "POST", "/subscribe", 422, "email", "public",
               content=b"email=%FF%FE%40example.com", headers=form),
        Attack("multipart without boundary", "POST", "/subscribe", 400, "boundary", "public",
               content=b"x", headers={"content-type": "multipart/form-data"}),
        Attack("body over the limit", "POST", "/subscribe", 413, "larger than", "public",
               content=b"email=" + b"a" * 1_100_000, headers=form),
        Attack("absurd Content-Length", "POST", "/subscribe", 413, "larger than", "public",
               content=b"email=a%40example.com", headers=form | {"content-length": "9" * 30}),
        # Links
        Attack("forged confirm token", "POST", "/confirm/MQ.Zz.forged", 400, "not valid", "public",
               headers={"accept": "application/json"}),
        Attack("token of another purpose", "POST", "/confirm/{unsubscribe_token}", 400,
               "not valid", "public", headers={"accept": "application/json"}),
        Attack("tampered unsubscribe", "POST", "/unsubscribe/{unsubscribe_token}x", 400,
               "not valid", "public", headers={"accept": "application/json"}),
        # The editor API
        Attack("no token", "POST", "/api/statements", 401, "bearer", "nobody", json=statement),
        Attack("wrong token", "POST", "/api/statements", 403, "invalid", "stranger",
               json=statement),
        Attack("no token, broken body", "POST", "/api/statements", 401, "bearer", "nobody",
               content=b"{not json", headers=as_json),
        Attack("CRLF Bcc in title", "POST", "/api/statements", 422, "title", json=statement
               | {"title": "Hi" + crlf_bcc}),
        Attack("NUL in title", "POST", "/api/statements", 422, "title",
               json=statement | {"title": "Hi\x00"}),
        Attack("U+2028 in title", "POST", "/api/statements", 422, "title",
               json=statement | {"title": "Hi\u2028Bcc: x@example.com"}),
        Attack("CR alone in title", "POST", "/api/statements", 422, "title",
               json=statement | {"title": "Hi\rBcc: x@example.com"}),
        Attack("title over 300", "POST", "/api/statements", 422, f"at most {MAX_TITLE}",
               json=statement | {"title": "t" * (MAX_TITLE + 1)}),
        Attack("statement over 200,000 characters", "POST", "/api/statements", 422,
               f"at most {MAX_BODY}", json=statement | {"body_markdown": "é" * (MAX_BODY + 1)}),
        Attack("statement over the body limit", "POST", "/api/statements", 413, "larger than",
               json=statement | {"body_markdown": "x" * 1_200_000}),
        Attack("NUL in Markdown", "POST", "/api/statements", 422, "NUL",
               json=statement | {"body_markdown": "a\x00b"}),
        Attack("javascript: URL", "POST", "/api/statements", 422, "url",
               json=statement | {"url": "javascript:alert(1)"}),
        Attack("CRLF in URL", "POST", "/api/statements", 422, "url",
               json=statement | {"url": "https://example.org/\r\nBcc: x@example.com"}),
        Attack("CRLF in author", "POST", "/api/statements", 422, "author",
               json=statement | {"author": "Ann" + crlf_bcc}),
        Attack("unknown field", "POST", "/api/statements", 422, "editor_id",
               json=statement | {"editor_id": 1}),
        Attack("statement id past BIGINT", "POST", "/api/blasts", 422, "statement_id",
               json={"statement_id": 2**64}),
        Attack("send_at past year 9999 in UTC", "POST", "/api/blasts", 422, "out of range",
               json={"statement_id": sid, "send_at": "9999-12-31T23:59:59-23:59"}),
        Attack("SMTP command in test address", "POST", f"/api/statements/{sid}/test", 422, "to:",
               json={"to": [smtp_inject]}),
        Attack("21 test addresses", "POST", f"/api/statements/{sid}/test", 422, "to",
               json={"to": [f"t{i}@example.com" for i in range(21)]}),
        Attack("path id past BIGINT", "DELETE", f"/api/subscribers/{BIG}", 422, "subscriber_id"),
        Attack("offset past BIGINT", "GET", f"/api/subscribers?offset={BIG}", 422, "offset"),
        Attack("NUL in search", "GET", "/api/subscribers?q=a%00b", 422, "control"),
        Attack("unknown blast action", "POST", "/api/blasts/1/explode", 404, "explode"),
        # The admin UI
        Attack("admin post without CSRF", "POST", "/admin/statements", 403, "could not be accepted",
               "admin-no-csrf", data=statement),
        Attack("admin CRLF Bcc in title", "POST", "/admin/statements", 422, "title", "admin",
               data=statement | {"title": "Hi" + crlf_bcc}),
        Attack("admin send_at out of range", "POST", f"/admin/statements/{sid}/blast", 422,
               "out of range", "admin", data={"when": "at", "send_at": "9999-12-31T23:59-23:59"}),
        Attack("admin SMTP command in test address", "POST", f"/admin/statements/{sid}/test",
               422, "No test sent", "admin", data={"to": smtp_inject}),
        Attack("admin path id past BIGINT", "GET", f"/admin/statements/{BIG}", 422,
               "statement_id", "admin"),
    ]  # fmt: skip


@pytest.mark.slow(30)
async def test_hostile_inputs_are_refused_and_write_nothing(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer
) -> None:
    await seed_subscribers(settings, confirmed=2)
    token = await editor_token(settings)
    r = await app_client.post(
        "/api/statements", json={"title": "T", "body_markdown": "B"}, headers=auth(token)
    )
    sid = int(r.json()["id"])
    csrf = await admin_login(app_client, token)
    tokens = Tokens(settings.signing_keys, settings.confirm_token_ttl_s)
    table = attacks(sid)
    assert len(table) >= 30
    for attack in table:
        headers = dict(attack.headers)
        data = dict(attack.data) if attack.data is not None else None
        if attack.who == "editor":
            headers |= auth(token)
        elif attack.who == "stranger":
            headers |= auth("mlr_" + "x" * 43)
        elif attack.who == "admin" and data is not None:
            data["csrf_token"] = csrf
        path = attack.path.replace("{unsubscribe_token}", tokens.unsubscribe(1))
        before = await table_counts(settings)
        r = await app_client.request(
            attack.method, path, json=attack.json, data=data, content=attack.content,
            headers=headers,
        )  # fmt: skip
        assert r.status_code == attack.status, (attack.label, r.status_code, r.text[:300])
        assert attack.says.lower() in r.text.lower(), (attack.label, r.text[:500])
        assert "Traceback" not in r.text
        assert await table_counts(settings) == before, attack.label
    assert smtp.messages == []  # not even the refused test sends reached the relay


async def test_limits_say_what_they_are(app_client: httpx.AsyncClient, settings: Settings) -> None:
    token = await editor_token(settings)
    r = await app_client.post(
        "/api/statements",
        json={"title": "T", "body_markdown": "x" * 2_000_000},
        headers=auth(token),
    )
    assert r.status_code == 413
    assert r.json() == {"detail": f"request body larger than {settings.max_body_bytes} bytes"}
    assert r.headers["x-content-type-options"] == "nosniff"  # the 413 is a normal answer too
    r = await app_client.post(
        "/api/statements",
        json={"title": "T", "body_markdown": "x" * (MAX_BODY + 1)},
        headers=auth(token),
    )
    assert r.status_code == 422
    assert f"body_markdown must be at most {MAX_BODY} characters" in r.json()["detail"]
    r = await app_client.post("/subscribe", json={"email": "a" * 250 + "@example.com"})
    assert r.json() == {"detail": "email: is longer than 254 characters", "field": "email"}
    assert await table_counts(settings) == dict.fromkeys(await table_counts(settings), 0)


async def chunked_upload(settings: Settings, path: str, headers: str, total: int) -> bytes:
    """POST ``total`` bytes in HTTP/1.1 chunks (no Content-Length) over a raw socket, reading
    the answer while still sending, as a browser does; returns the answer's head."""
    url = urlsplit(settings.base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    head = f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nTransfer-Encoding: chunked\r\n"
    writer.write((head + headers + "\r\n").encode())

    async def pump() -> None:
        chunk = b"a" * 65536
        try:
            for _ in range(total // len(chunk)):
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass  # the server stopped listening: that is the point

    sending = asyncio.create_task(pump())
    answer = b""
    try:
        while b"\r\n\r\n" not in answer:
            more = await asyncio.wait_for(reader.read(65536), 20)
            if not more:
                break
            answer += more
    except ConnectionResetError:
        pass  # uvicorn closes at once with the upload unread; the answer came first
    finally:
        sending.cancel()
        writer.close()
    return answer


async def test_chunked_body_without_length_is_cut_at_the_limit(
    live: httpx.AsyncClient, settings: Settings
) -> None:
    """Through uvicorn, so the body really arrives as chunks with no Content-Length to check."""
    token = await editor_token(settings)
    form = "Content-Type: application/x-www-form-urlencoded\r\n"
    answer = await chunked_upload(settings, "/subscribe", form, 20_000_000)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"content-type: application/json" in answer.lower()
    editor = f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
    answer = await chunked_upload(settings, "/api/statements", editor, 20_000_000)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert await table_counts(settings) == dict.fromkeys(await table_counts(settings), 0)

    async def small() -> AsyncIterator[bytes]:  # a chunked body under the limit still works
        yield b'{"title": "Chunked", '
        yield b'"body_markdown": "fine"}'

    r = await live.post(
        "/api/statements",
        content=small(),
        headers=auth(token) | {"content-type": "application/json"},
    )
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 201, r.text


async def test_a_client_that_sends_its_whole_upload_first_still_reads_the_413(
    live: httpx.AsyncClient, settings: Settings
) -> None:
    """The server reads on after a 413 before it closes (a lingering close).

    Closing a socket with unread bytes in it makes the kernel answer with a reset, and a
    client that is still writing then loses the 413 it has not read yet. This client
    writes all 1.5 MB (the limit is 1 MB) and the end of the body before it reads a byte,
    so without the lingering close its writes fail or its read ends in a reset.
    """
    url = urlsplit(settings.base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(
        f"POST /subscribe HTTP/1.1\r\nHost: {url.netloc}\r\nTransfer-Encoding: chunked\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n\r\n".encode()
    )
    chunk = b"a" * 65536
    for _ in range(24):
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 20)  # to the end: a reset raises here
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert answer.endswith(b"}"), answer[-200:]  # the whole JSON answer
    assert await table_counts(settings) == dict.fromkeys(await table_counts(settings), 0)


async def test_csv_size_limit_and_broken_files(settings: Settings, tmp_path: Path) -> None:
    big = tmp_path / "big.csv"
    with big.open("wb") as fh:  # sparse: the size is real, the disk is not used
        fh.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ImportFileError, match="200 MB import limit; split the file"):
        check_file(big)
    binary = tmp_path / "latin1.csv"
    binary.write_bytes(b"email,name\r\nb@example.com,Jos\xe9\r\n")
    with pytest.raises(ImportFileError, match="line 2 is not UTF-8"):
        await import_csv(settings, binary, ImportOptions())
    assert await table_counts(settings) == dict.fromkeys(await table_counts(settings), 0)


# Header and SMTP command injection, on the wire ----------------------------------------------


def head_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def header_names(raw: bytes) -> list[str]:
    return [
        line.split(b":", 1)[0].decode().lower()
        for line in head_of(raw).split(b"\r\n")
        if line and line[:1] not in (b" ", b"\t")
    ]


def assert_clean_head(raw: bytes, expected: list[str]) -> None:
    """Exactly the expected header fields, each once, on CRLF lines of printable ASCII."""
    head = head_of(raw)
    assert sorted(header_names(raw)) == sorted(expected), header_names(raw)
    unfolded = head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    for line in unfolded.split(b"\r\n"):
        assert re.fullmatch(rb"[A-Za-z0-9-]+: [\x20-\x7e]*", line), line
    assert b"\r" not in head.replace(b"\r\n", b"") and b"\n" not in head.replace(b"\r\n", b"")
    # The body may quote any text; the parts keep their own two headers and nothing else.
    msg = message_from_bytes(raw, policy=policy.default)
    assert msg.get_content_type() == "multipart/alternative" and not msg.defects
    for part in msg.iter_parts():
        assert part.keys() == ["Content-Type", "Content-Transfer-Encoding"], part.keys()


def same_phrase(decoded: str, typed: str) -> bool:
    """What a header shows is the typed text on one line (CPython's parser may add a space
    between encoded-words, which RFC 2047 says to drop)."""
    return decoded.replace(" ", "") == clean_header_text(typed).replace(" ", "")


HOSTILE_NAMES = [
    "Eve\r\nBcc: victim@example.com",
    "Eve\rBcc: victim@example.com",
    "Eve\nBcc: victim@example.com",
    "Eve\x00Bcc: victim@example.com",
    "Eve\u2028Bcc: victim@example.com",
    "Eve\u2029Bcc: victim@example.com",
    "Eve\x85Bcc: victim@example.com",
    "Eve\x0bBcc: victim@example.com",
    "Eve\r\n\r\n<html>injected body</html>",
]
# Accepted as typed, and must still come out as one harmless header value.
TRICKY_NAMES = [
    "=?utf-8?q?Eve=0D=0ABcc:_victim@example.com?=",
    "=?utf-8?b?RXZlDQpCY2M6IHZpY3RpbUBleGFtcGxlLmNvbQ==?=",
    '"Eve" <victim@example.com>, Bcc',
    "Eve: Bcc: victim@example.com",
    "Ünïcödé Ëvé " + "ß" * 80,
    '\\"quoted\\" Eve',
]
CONFIRM_HEADERS = ["from", "to", "subject", "date", "message-id", "mime-version", "content-type"]


async def test_names_cannot_add_headers_to_the_confirmation_mail(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer, start_worker: Any
) -> None:
    await start_worker()
    # Refused at the form, nothing written, nothing sent.
    before = await table_counts(settings)
    for i, name in enumerate(HOSTILE_NAMES):
        r = await app_client.post("/subscribe", json={"email": f"h{i}@example.com", "name": name})
        assert r.status_code == 422 and r.json()["field"] == "name", (name, r.text)
    assert await table_counts(settings) == before
    # Accepted tricky names, and hostile names planted behind the form's back (an old row,
    # a hand-edited table): the renderer is the last line, so each must arrive harmless.
    planted = {f"p{i}@example.com": name for i, name in enumerate(HOSTILE_NAMES)}
    for email, name in planted.items():
        await execute(
            settings,
            "INSERT INTO subscribers (email, name, status, created_at, updated_at) "
            "VALUES (:e, :n, 'pending', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
            e=email,
            n=name.replace("\x00", "\ufffd") if "postgres" in settings.database_url else name,
        )
    typed = {f"t{i}@example.com": name for i, name in enumerate(TRICKY_NAMES)}
    for email, name in (typed | planted).items():
        r = await app_client.post("/subscribe", json={"email": email, "name": name})
        assert r.status_code == (202 if email in typed else 422), (email, r.text)
        if email in planted:  # the form refuses it; a sign-up without a name mails the row
            r = await app_client.post("/subscribe", json={"email": email})
            assert r.status_code == 202
    everyone = typed | planted
    await wait_until(lambda: len(smtp.messages) >= len(everyone), timeout=30)
    for received in smtp.messages:
        assert_clean_head(received.data, CONFIRM_HEADERS)
        name = everyone[received.rcpt]
        if "postgres" in settings.database_url:
            name = name.replace("\x00", "\ufffd")
        to = received.message["To"].addresses[0]
        assert to.addr_spec == received.rcpt
        # Names never reach the confirmation mail (a stranger may have typed them).
        assert to.display_name == "", (name, to.display_name)
    assert {m.rcpt for m in smtp.messages} == set(everyone)


@pytest.mark.slow(10)
async def test_titles_cannot_add_headers_to_blasts_or_test_sends(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer, start_worker: Any
) -> None:
    """Titles with line breaks are refused by the API (see the table); here they are
    planted in SQL, and the blast and the test send must still carry one Subject."""
    people = await seed_subscribers(settings, confirmed=2)
    token = await editor_token(settings)
    await start_worker()
    titles = HOSTILE_NAMES + TRICKY_NAMES
    for title in titles:
        r = await app_client.post(
            "/api/statements", json={"title": "placeholder", "body_markdown": "Body."},
            headers=auth(token),
        )  # fmt: skip
        sid = int(r.json()["id"])
        planted = title.replace("\x00", "\ufffd") if "postgres" in settings.database_url else title
        await execute(settings, "UPDATE statements SET title = :t WHERE id = :i", t=planted, i=sid)
        smtp.recorder.clear()
        r = await app_client.post(
            f"/api/statements/{sid}/test", json={"to": ["editor@example.com"]}, headers=auth(token)
        )
        assert r.json()["results"] == {"editor@example.com": "sent"}, r.text
        r = await app_client.post("/api/blasts", json={"statement_id": sid}, headers=auth(token))
        assert r.status_code == 202
        await queue_settled(settings)  # the blast and anything it might repeat
        assert sorted(m.rcpt for m in smtp.messages) == sorted(
            ["editor@example.com", *people["confirmed"]]
        )
        for received in smtp.messages:
            names = header_names(received.data)
            expected = ["from", "to", "subject", "date", "message-id", "mime-version"]
            expected += ["list-unsubscribe", "list-unsubscribe-post", "list-id", "content-type"]
            if received.rcpt == "editor@example.com":
                expected.append("x-mailer-test")
            assert_clean_head(received.data, expected)
            subject = str(received.message["Subject"]).removeprefix("[TEST] ")
            assert same_phrase(subject, planted), (title, subject)
            assert names.count("subject") == 1


async def test_import_names_and_addresses_cannot_inject(
    settings: Settings, smtp: SmtpServer, start_worker: Any, tmp_path: Path
) -> None:
    await start_worker()
    path = tmp_path / "people.csv"
    rows = [["email", "name"]]
    rows += [[f"bad{i}@example.com", name] for i, name in enumerate(HOSTILE_NAMES)]
    rows += [[f"ok{i}@example.com", name] for i, name in enumerate(TRICKY_NAMES)]
    rows += [
        ["a@example.com\r\nRCPT TO:<evil@example.com>", ""],
        ["a@example.com>\r\nDATA", ""],
        ["<evil@example.com>", ""],
        ["evil@example.com\x00", ""],
    ]
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    report = await import_csv(settings, path, ImportOptions())
    assert report.bad == len(HOSTILE_NAMES) + 4, report.lines()
    assert report.imported == len(TRICKY_NAMES) and report.balanced
    assert await subscriber(settings, "bad0@example.com") is None
    await queue_settled(settings)
    assert sorted(m.rcpt for m in smtp.messages) == sorted(
        f"ok{i}@example.com" for i in range(len(TRICKY_NAMES))
    )
    for received in smtp.messages:
        assert_clean_head(received.data, CONFIRM_HEADERS)
        # The imported names are stored; they never reach the confirmation mail.
        assert received.message["To"].addresses[0].display_name == ""


async def test_addresses_cannot_smuggle_smtp_commands(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer, start_worker: Any
) -> None:
    """Refused at every door; and an address planted in SQL fails its one delivery
    instead of reaching the relay as a second command."""
    token = await editor_token(settings)
    r = await app_client.post(
        "/api/statements", json={"title": "T", "body_markdown": "B"}, headers=auth(token)
    )
    sid = int(r.json()["id"])
    smuggled = [
        "a@example.com\r\nRCPT TO:<evil@example.com>",
        "a@example.com>\r\nRCPT TO:<evil@example.com",
        "a@example.com\nRCPT TO:<evil@example.com>",
        "a@example.com\rDATA",
        "a@example.com\x00RSET",
        "<evil@example.com> SIZE=1",
        "evil@example.com NOTIFY=SUCCESS",
        '"a\r\nRCPT TO:<evil@example.com>"@example.com',
    ]
    for address in smuggled:
        r = await app_client.post("/subscribe", json={"email": address})
        assert r.status_code == 422, address
        r = await app_client.post(
            f"/api/statements/{sid}/test", json={"to": [address]}, headers=auth(token)
        )
        assert r.status_code == 422, address
    planted = "planted@example.com\r\nRCPT TO:<evil@example.com>"
    await execute(
        settings,
        "INSERT INTO subscribers (email, status, created_at, updated_at) "
        "VALUES (:e, 'confirmed', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
        e=planted,
    )
    await seed_subscribers(settings, confirmed=2)
    await start_worker()
    r = await app_client.post("/api/blasts", json={"statement_id": sid}, headers=auth(token))
    bid = int(r.json()["id"])

    async def finished() -> dict[str, Any] | None:
        p = (await app_client.get(f"/api/blasts/{bid}", headers=auth(token))).json()
        return p if p["status"] == "done" else None

    done = await wait_until(finished, timeout=30)
    assert done["sent"] == 2 and done["failed"] == 1, done
    assert sorted(m.rcpt for m in smtp.messages) == [
        "conf000000@example.com",
        "conf000001@example.com",
    ]
    for received in smtp.messages:
        assert b"evil@example.com" not in received.data
        assert received.mail_from.lower() == settings.from_address.lower() or "bounces" in (
            received.mail_from
        )


# Pages: headers, cookies, escaping, redirects -------------------------------------------------


def assert_page_headers(r: httpx.Response, *, https: bool = False) -> None:
    policy = r.headers["content-security-policy"]
    directives = dict((d.strip().split(" ", 1) + [""])[:2] for d in policy.split(";") if d.strip())
    assert "'unsafe-inline'" not in directives.get("script-src", ""), policy
    assert directives.get("script-src") == "'self'" or "sandbox" in directives, policy
    if "sandbox" in directives:  # email previews: framed by our own admin page only
        assert directives["frame-ancestors"] == "'self'" and directives["default-src"] == "'none'"
    else:
        assert directives["frame-ancestors"] == "'none'", policy
        assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert ("strict-transport-security" in r.headers) == https
    assert re.search(r"<script(?![^>]*\bsrc=)", r.text) is None, "inline script"
    assert not re.search(r"<[^>]+\son[a-z]+=", r.text), "inline event handler"


@pytest.mark.parametrize(
    "settings_overrides",
    [{}, {"base_url": "https://127.0.0.1:{port}"}],
    ids=["http", "https"],
)
async def test_every_page_has_security_headers_and_cookies_are_locked(
    live: httpx.AsyncClient, settings: Settings
) -> None:
    https = settings.base_url.startswith("https://")
    token = await editor_token(settings)
    await seed_subscribers(settings, confirmed=1)
    tokens = Tokens(settings.signing_keys, settings.confirm_token_ttl_s)
    pages: list[httpx.Response] = [
        await live.get("/subscribe"),
        await live.post("/subscribe", data={"email": "new@example.com"}),
        await live.post("/subscribe", data={"email": "not an address"}),
        await live.get(f"/confirm/{tokens.confirm(1)}"),
        await live.get("/confirm/forged"),
        await live.post("/confirm/forged"),
        await live.get(f"/unsubscribe/{tokens.unsubscribe(1)}"),
        await live.post("/unsubscribe/forged"),
        await live.get("/admin/login"),
    ]
    cookies: list[str] = []
    r = await live.post("/admin/login", data={"token": "wrong"})
    pages.append(r)
    r = await live.post("/admin/login", data={"token": token})
    cookies += r.headers.get_list("set-cookie")
    for path in ("/admin/statements", "/admin/statements/new", "/admin/subscribers",
                 "/admin/subscribers/1", "/admin/blasts", "/admin/queue"):  # fmt: skip
        r = await live.get(path)
        cookies += r.headers.get_list("set-cookie")
        pages.append(r)
    csrf = CSRF.search(pages[-1].text)
    assert csrf
    r = await live.post(
        "/admin/statements",
        data={"csrf_token": csrf.group(1), "title": "T", "body_markdown": "B"},
    )
    cookies += r.headers.get_list("set-cookie")
    pages.append(await live.get(r.headers["location"]))
    pages.append(await live.get("/admin/statements/1/preview"))
    r = await live.post("/admin/logout", data={"csrf_token": csrf.group(1)})
    cookies += r.headers.get_list("set-cookie")
    for page in pages:
        assert page.headers["content-type"].startswith("text/html"), page.url
        assert_page_headers(page, https=https)
    assert len(cookies) >= 4  # session, flash, flash cleared, session ended
    for cookie in cookies:
        attrs = [a.strip().lower() for a in cookie.split(";")]
        assert "httponly" in attrs and "samesite=lax" in attrs, cookie
        assert ("secure" in attrs) == https, cookie
        assert "path=/admin" in attrs, cookie
    # JSON and errors get the same headers, so a browser never sniffs them as HTML.
    for r in (await live.get("/healthz"), await live.get("/no-such-page")):
        assert r.headers["x-content-type-options"] == "nosniff"
    assert (await live.get("/docs")).status_code == 404  # it needs inline scripts


async def test_everything_shown_is_escaped(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer, start_worker: Any
) -> None:
    await start_worker()
    token = await editor_token(settings)
    xss = '"><img src=x onerror=alert(1)><script>alert(2)</script>'
    r = await app_client.post("/subscribe", data={"email": xss})
    assert r.status_code == 422 and "<script>alert(2)" not in r.text and "&lt;script&gt;" in r.text
    r = await app_client.post("/subscribe", json={"email": "xss@example.com", "name": xss})
    assert r.status_code == 202
    await wait_until(lambda: smtp.recorder.to("xss@example.com"))
    mail = smtp.recorder.to("xss@example.com")[0].message
    html = mail.get_body(preferencelist=("html",)).get_content()
    assert "<script>alert(2)" not in html and "<img src=x" not in html
    assert "alert(2)" not in html  # the typed name never reaches the confirmation mail
    r = await app_client.post(
        "/api/statements",
        json={"title": xss, "author": xss, "body_markdown": f"{xss}\n\n[a](javascript:alert(3))"},
        headers=auth(token),
    )
    sid = int(r.json()["id"])
    preview = (await app_client.get(f"/api/statements/{sid}/preview", headers=auth(token))).text
    assert "<script" not in preview.lower() and not re.search(r"<img[^>]*onerror", preview)
    assert not re.search(r"(href|src)=[\"']?\s*javascript:", preview, re.I)
    await admin_login(app_client, token)
    sub_id = (await subscriber(settings, "xss@example.com")).id  # type: ignore[union-attr]
    for path in ("/admin/statements", f"/admin/statements/{sid}", f"/admin/subscribers/{sub_id}"):
        page = (await app_client.get(path)).text
        assert "<script>alert(2)" not in page and "<img src=x" not in page, path
        assert "&lt;script&gt;" in page or "&#34;&gt;&lt;img" in page, path


async def test_no_open_redirect(live: httpx.AsyncClient, settings: Settings) -> None:
    token = await editor_token(settings)
    evil = "https://evil.example/phish"
    locations = []
    for path in (
        f"/admin/login?next={evil}",
        f"/admin?next={evil}",
        "//evil.example/",
        "//evil.example/%2e%2e",
        "/\\evil.example/",
        "/%2F%2Fevil.example/",
        "/admin/",
        "/subscribe/",
        "/confirm/x/",
    ):
        r = await live.get(path)
        locations.append(r.headers.get("location"))
    r = await live.post(f"/admin/login?next={evil}", data={"token": token, "next": evil})
    assert r.headers["location"] == "/admin/statements"
    locations.append(r.headers["location"])
    r = await live.post(f"/admin/logout?next={evil}", data={"next": evil})
    locations.append(r.headers.get("location"))
    r = await live.post("/unsubscribe/forged", data={"List-Unsubscribe": "One-Click"})
    assert "location" not in r.headers  # RFC 8058: never a redirect
    for location in filter(None, locations):
        assert (
            location.startswith("/")
            and not location.startswith("//")
            or (location.startswith(settings.base_url + "/"))
        ), location
        assert "evil" not in location, location


def test_confirmation_and_statement_templates_autoescape(settings: Settings) -> None:
    from mailer.render import Renderer

    # The visitor's name no longer reaches the mail at all; the list name still does.
    renderer = Renderer(settings.model_copy(update={"list_name": "<b>bold</b>"}))
    assert renderer.env.autoescape is not False
    raw = renderer.confirmation(to="a@example.com", confirm_url="https://example.org/confirm/x")
    msg = message_from_bytes(raw, policy=policy.default)
    html = msg.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
