"""Smaller hardening: DKIM oversigning, erasure scrubbing the relay's words in any letter
case, and the editor API's preview sandboxed like the admin one (docs/security.md).
"""

from __future__ import annotations

import base64
import re
from typing import Any

import dkim
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from helpers import editor_token, sql
from sqlalchemy import insert

from mailer.config import Settings, load_settings
from mailer.db import make_engine, utcnow
from mailer.dkim import DkimSigner
from mailer.importer import ImportOptions, import_csv
from mailer.models import Blast, Statement
from mailer.render import Renderer, StatementContent, make_message_id
from mailer.statements import render_markdown

# DKIM ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signer_and_dns() -> tuple[DkimSigner, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"mail._domainkey.example.org."
        return record

    return DkimSigner("example.org", "mail", pem), dns


def renderer() -> Renderer:
    return Renderer(
        load_settings(
            base_url="https://news.example.org",
            secret_key="dkim-test-secret-key-0123456789abcdef",
            feedback_id="a:b:c:mailer",
        )
    )


def statement_mail() -> bytes:
    r = renderer()
    html, text = render_markdown("Hello **world**.")
    content = StatementContent("A statement", html, text, "Ann", None)
    compiled = r.compile_statement(content, blast_id=7)
    return compiled.build(
        to="reader@example.com",
        unsubscribe_url="https://news.example.org/unsubscribe/tok",
        message_id=make_message_id(r.settings, 7, 42),
    )


def add_on_top(signed: bytes, header: bytes) -> bytes:
    """A header added after signing, above the signed ones (where clients look first)."""
    signature, sep, rest = signed.partition(b"\r\n")
    while rest[:1] in (b" ", b"\t"):  # the signature header is folded
        line, _, rest = rest.partition(b"\r\n")
        signature += b"\r\n" + line
    return signature + b"\r\n" + header + b"\r\n" + rest


def add_below(signed: bytes, header: bytes) -> bytes:
    head, _, body = signed.partition(b"\r\n\r\n")
    return head + b"\r\n" + header + b"\r\n\r\n" + body


def signed_names(signed: bytes) -> list[str]:
    sig = signed.split(b"\r\n\r\n", 1)[0].decode()
    h = re.search(r"h=([^;]+);", re.sub(r"\s+", "", sig.split("DKIM-Signature:", 1)[1]))
    assert h is not None
    return [x.lower() for x in h.group(1).split(":")]


def test_dkim_oversigns_so_nothing_can_be_added_after_signing(
    signer_and_dns: tuple[DkimSigner, Any],
) -> None:
    signer, dns = signer_and_dns
    signed = signer.sign(statement_mail())
    assert dkim.verify(signed, dnsfunc=dns)
    names = signed_names(signed)
    for header in ("from", "to", "subject", "date", "message-id", "list-unsubscribe",
                   "list-unsubscribe-post", "feedback-id"):  # fmt: skip
        assert names.count(header) == 2, (header, names)  # once more than it occurs
    assert names.count("list-id") == 1 and names.count("mime-version") == 1

    # The proof: a second Subject, above or below the signed one, breaks the signature.
    assert not dkim.verify(add_on_top(signed, b"Subject: Your account is locked"), dnsfunc=dns)
    assert not dkim.verify(add_below(signed, b"Subject: Your account is locked"), dnsfunc=dns)
    for extra in (
        b"From: Security Team <security@example.org>",
        b"To: someone-else@example.com",
        b"Date: Mon, 01 Jan 2024 00:00:00 +0000",
        b"Message-ID: <forged@example.org>",
        b"List-Unsubscribe: <https://evil.example/u>",
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        b"Feedback-ID: x:y:z:evil",
    ):
        assert not dkim.verify(add_on_top(signed, extra), dnsfunc=dns), extra


def test_dkim_forbids_adding_list_headers_to_a_confirmation(
    signer_and_dns: tuple[DkimSigner, Any],
) -> None:
    signer, dns = signer_and_dns
    mail = renderer().confirmation(
        to="new@example.com", confirm_url="https://news.example.org/confirm/tok"
    )
    signed = signer.sign(mail)
    assert dkim.verify(signed, dnsfunc=dns)
    assert signed_names(signed).count("list-unsubscribe") == 1  # absent: named once, empty
    evil = add_on_top(signed, b"List-Unsubscribe: <https://evil.example/u>")
    assert not dkim.verify(evil, dnsfunc=dns)


# Erasure -----------------------------------------------------------------------------------


async def test_erase_scrubs_blast_reasons_in_any_letter_case(
    app_client: httpx.AsyncClient, settings: Settings, tmp_path: Any
) -> None:
    listed = tmp_path / "l.csv"
    listed.write_text("email,name\nerase.me@example.org,E\nkeep@example.org,K\n")
    await import_csv(settings, listed, ImportOptions(confirmed=True, consent_source="test"))
    now = utcnow()
    reasons = [
        "paused: 550 5.7.1 <Erase.Me@EXAMPLE.org>: refused; again ERASE.ME@example.ORG",
        "paused: 550 <erase.me@example.org> refused",
        "paused: 550 <keep@example.org> refused",
    ]
    engine = make_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            statement = {"title": "T", "body_markdown": "b", "body_html": "<p>b</p>"}
            statement |= {"body_text": "b", "created_at": now, "updated_at": now}
            sid = (
                await conn.execute(insert(Statement).returning(Statement.id), [statement])
            ).scalar_one()
            for reason in reasons:
                await conn.execute(
                    insert(Blast).values(
                        statement_id=sid,
                        status="paused",
                        total=0,
                        policy_failures=0,
                        created_at=now,
                        reason=reason,
                    )
                )
    finally:
        await engine.dispose()
    token = await editor_token(settings)
    sub_id = await sql(settings, "SELECT id FROM subscribers WHERE email='erase.me@example.org'")
    r = await app_client.delete(
        f"/api/subscribers/{sub_id[0][0]}", headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 204
    after = [reason for (reason,) in await sql(settings, "SELECT reason FROM blasts ORDER BY id")]
    assert "erase.me@example.org" not in " ".join(after).lower()
    assert after[0] == ("paused: 550 5.7.1 <[erased address]>: refused; again [erased address]")
    assert after[1] == "paused: 550 <[erased address]> refused"
    assert after[2] == reasons[2]


# The editor API's preview ----------------------------------------------------------------


async def test_api_preview_is_sandboxed_like_the_admin_preview(
    app_client: httpx.AsyncClient, settings: Settings
) -> None:
    token = await editor_token(settings)
    bearer = {"Authorization": f"Bearer {token}"}
    r = await app_client.post(
        "/api/statements",
        json={"title": "<script>alert(1)</script>", "body_markdown": "Hi."},
        headers=bearer,
    )
    sid = r.json()["id"]
    api = await app_client.get(f"/api/statements/{sid}/preview", headers=bearer)
    assert api.status_code == 200 and "<h1" in api.text
    login = await app_client.post("/admin/login", data={"token": token})
    assert login.status_code == 303
    admin = await app_client.get(f"/admin/statements/{sid}/preview")
    assert admin.status_code == 200
    for name in ("content-security-policy", "x-frame-options", "cache-control"):
        assert api.headers[name] == admin.headers[name], name
    policy = api.headers["content-security-policy"]
    assert policy.startswith("sandbox;") and "script-src" not in policy
    assert "default-src 'none'" in policy
