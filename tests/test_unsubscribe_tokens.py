"""Unsubscribe links and Message-IDs as bare HMACs (``u1.ID.MAC``), and every link and
Message-ID mailed before them still honoured: through uvicorn, and by the bounce matcher.

The "old way" below is what mailer/tokens.py and mailer/render.py did until the bare
HMAC replaced them: itsdangerous ``URLSafeSerializer(keys, salt="unsubscribe")``, and a
Message-ID MAC of 96 bits under the secret key itself.
"""

from __future__ import annotations

import hmac
import re

import httpx
import pytest
from helpers import events, seed_subscribers, subscriber, subscriber_ids, table_counts
from itsdangerous import URLSafeSerializer
from pydantic import SecretStr

from mailer.bounces.identify import from_headers
from mailer.config import Settings
from mailer.render import make_message_id, read_message_id
from mailer.runtime import Runtime
from mailer.tokens import TokenError, Tokens

OLD_KEY = "an-old-secret-key-kept-for-links-0001"
FOREIGN_KEY = "another-secret-key-never-ours-000000"
ROTATED = {"old_secret_keys": [SecretStr(OLD_KEY)]}
INVALID = "This unsubscribe link is not valid."
ONE_CLICK = {"content-type": "application/x-www-form-urlencoded"}


def old_way_token(key: str, subscriber_id: int) -> str:
    """An unsubscribe token exactly as the code before ``u1`` made it, under ``key``."""
    return URLSafeSerializer([key], salt="unsubscribe").dumps(subscriber_id)


def old_way_message_id(key: str, blast_id: int, subscriber_id: int) -> str:
    """A blast Message-ID exactly as the code before the sub-key made it."""
    message = f"msgid:{blast_id}:{subscriber_id}".encode()
    return f"<b{blast_id}.{hmac.new(key.encode(), message, 'sha256').hexdigest()[:24]}@x.org>"


def tokens_of(settings: Settings) -> Tokens:
    return Tokens(settings.signing_keys, settings.confirm_token_ttl_s)


def current_key(settings: Settings) -> str:
    return settings.signing_keys[-1]


def test_the_new_token_is_short_url_safe_and_bound_to_its_key() -> None:
    key = "k" * 32
    tokens = Tokens([key], 3600)
    token = tokens.unsubscribe(1234)
    assert re.fullmatch(r"u1\.1234\.[A-Za-z0-9_-]{22}", token)  # 128-bit MAC, no padding
    assert token == tokens.unsubscribe(1234)  # deterministic: no JSON, no clock
    assert tokens.read_unsubscribe(token) == 1234
    assert tokens.read_unsubscribe(tokens.unsubscribe(0)) == 0
    assert Tokens(["o" * 32, key], 3600).read_unsubscribe(token) == 1234  # rotated in
    assert Tokens([key, "n" * 32], 3600).read_unsubscribe(token) == 1234  # rotated out
    with pytest.raises(TokenError, match=INVALID):
        Tokens(["n" * 32], 3600).read_unsubscribe(token)  # a key we never had
    assert Tokens(["o" * 32, key], 3600).unsubscribe(1234) == token  # signed with the last


@pytest.mark.parametrize("settings_overrides", [ROTATED])
async def test_links_mailed_the_old_way_still_unsubscribe(
    live: httpx.AsyncClient, settings: Settings
) -> None:
    emails = (await seed_subscribers(settings, confirmed=4))["confirmed"]
    ids = await subscriber_ids(settings, emails)
    a, b, c, d = (ids[e] for e in emails)
    links = {
        emails[0]: ("old way, current key, one-click", old_way_token(current_key(settings), a)),
        emails[1]: ("old way, old key, page button", old_way_token(OLD_KEY, b)),
        emails[2]: ("u1, current key, one-click", tokens_of(settings).unsubscribe(c)),
        emails[3]: ("u1, old key, page button", Tokens([OLD_KEY], 1).unsubscribe(d)),
    }
    assert links[emails[0]][1].count(".") == 1 and links[emails[2]][1].startswith("u1.")
    for email, (name, token) in links.items():
        path = f"/unsubscribe/{token}"
        page = await live.get(path)  # what a link scanner does: shows a button, changes nothing
        assert page.status_code == 200 and "<button" in page.text, name
        assert await status(settings, email) == "confirmed", name
        if "one-click" in name:  # RFC 8058: the mailbox provider POSTs the header's URL
            r = await live.post(path, content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK)
        else:
            r = await live.post(path, data={})
        assert r.status_code == 200 and "unsubscribed" in r.text.lower(), (name, r.text)
        assert "location" not in r.headers
        assert await status(settings, email) == "unsubscribed", name
        sub_events = await events(settings, ids[email])
        assert [e.kind for e in sub_events].count("unsubscribed") == 1, name


async def status(settings: Settings, email: str) -> str:
    sub = await subscriber(settings, email)
    assert sub is not None
    return sub.status


@pytest.mark.parametrize("settings_overrides", [ROTATED])
async def test_bad_unsubscribe_tokens_are_refused_and_change_nothing(
    live: httpx.AsyncClient, settings: Settings
) -> None:
    email, neighbour = (await seed_subscribers(settings, confirmed=2))["confirmed"]
    ids = await subscriber_ids(settings, [email, neighbour])
    sub_id = ids[email]
    tokens = tokens_of(settings)
    good = tokens.unsubscribe(sub_id)
    prefix, digits, mac = good.split(".")
    flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    old_good = old_way_token(current_key(settings), sub_id)
    message_id = make_message_id(settings, 1, sub_id)
    cases = {
        "tampered MAC": f"u1.{digits}.{flipped}",
        "truncated MAC": good[:-1],
        "truncated to 64 bits": f"u1.{digits}.{mac[:11]}",
        "no MAC": f"u1.{digits}.",
        "no MAC, no dot": f"u1.{digits}",
        "MAC with padding": good + "==",
        "another subscriber's id": f"u1.{ids[neighbour]}.{mac}",
        "leading zero": f"u1.0{digits}.{mac}",
        "unknown version": f"u2.{digits}.{mac}",
        "MAC with its case swapped": f"u1.{digits}.{mac.swapcase()}",
        "foreign key": Tokens([FOREIGN_KEY], 1).unsubscribe(sub_id),
        "foreign key, old way": old_way_token(FOREIGN_KEY, sub_id),
        "confirm token (wrong purpose)": tokens.confirm(sub_id),
        "Message-ID MAC (wrong purpose)": f"u1.{digits}.{message_id[1:-1].split('.')[1][:22]}",
        "old way, tampered": old_good[:-1] + ("A" if old_good[-1] != "A" else "B"),
        "old way, truncated": old_good[:-3],
        "garbage": "not-a-token",
    }
    before = await table_counts(settings)
    for name, token in cases.items():
        with pytest.raises(TokenError, match=INVALID):
            tokens.read_unsubscribe(token)
        path = f"/unsubscribe/{token}"
        for method in ("GET", "POST"):
            r = await live.request(method, path)
            assert r.status_code == 400, (name, method, r.status_code)
            assert "<h1>This link does not work</h1>" in r.text and INVALID in r.text, name
        r = await live.post(path, content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK)
        assert r.status_code == 400, (name, "one-click")
        r = await live.post(path, headers={"accept": "application/json"})
        assert (r.status_code, r.json()) == (400, {"detail": INVALID}), name
    assert await table_counts(settings) == before
    assert [await status(settings, e) for e in (email, neighbour)] == ["confirmed"] * 2
    assert (await live.get(f"/unsubscribe/{good}")).status_code == 200  # the real one works


def test_message_ids_use_a_sub_key_and_old_ones_are_still_read() -> None:
    key, old = "k" * 32, "o" * 32
    settings = Settings(env="dev", secret_key=key, old_secret_keys=[old])
    message_id = make_message_id(settings, 12, 345)
    assert re.fullmatch(r"<b12\.[0-9a-f]{32}@example\.org>", message_id)  # 128 bits
    assert read_message_id(settings, message_id, 345) == 12
    legacy = hmac.new(key.encode(), b"msgid:12:345", "sha256").hexdigest()
    assert legacy[:32] not in message_id  # not the raw key any more
    for made_with in (key, old):  # mailed before the upgrade, under the current or an old key
        before = old_way_message_id(made_with, 12, 345)
        assert read_message_id(settings, before, 345) == 12
        assert read_message_id(settings, before, 346) is None
        assert read_message_id(settings, before.replace("b12.", "b13."), 345) is None
    assert read_message_id(settings, message_id[:-1], 345) is None  # a damaged one
    assert read_message_id(settings, old_way_message_id(FOREIGN_KEY, 12, 345), 345) is None
    new_mac = message_id[1:-1].split(".")[1].split("@")[0]
    assert read_message_id(settings, f"<b12.{new_mac[:24]}@x.org>", 345) is None  # cut short


@pytest.mark.parametrize("settings_overrides", [ROTATED])
async def test_bounces_of_mail_sent_before_the_upgrade_are_still_matched(
    settings: Settings,
) -> None:
    emails = (await seed_subscribers(settings, confirmed=2))["confirmed"]
    ids = await subscriber_ids(settings, emails)
    runtime = Runtime.create(settings)
    try:
        async with runtime.reads() as session:
            for email, key in zip(emails, (current_key(settings), OLD_KEY), strict=True):
                sub_id = ids[email]
                old_header = (
                    f"<{settings.base_url}/unsubscribe/{old_way_token(key, sub_id)}>, "
                    "<mailto:unsubscribe@example.org>"
                )
                message_id = old_way_message_id(key, 77, sub_id)
                by_token = await from_headers(
                    session,
                    settings,
                    runtime.tokens,
                    message_id=message_id,
                    list_unsubscribe=old_header,
                )
                assert (by_token.subscriber_id, by_token.blast_id) == (sub_id, 77)
                assert by_token.evidence == "list-unsubscribe"
                by_message_id = await from_headers(
                    session,
                    settings,
                    runtime.tokens,
                    message_id=message_id,
                    list_unsubscribe=None,
                    addresses=[emails[1 - emails.index(email)], email],
                )
                assert (by_message_id.subscriber_id, by_message_id.blast_id) == (sub_id, 77)
                assert by_message_id.evidence == "message-id"
            sub_id = ids[emails[0]]  # and what is mailed from now on
            new_header = f"<{runtime.unsubscribe_url(sub_id)}>"
            new_id = make_message_id(settings, 78, sub_id)
            now = await from_headers(
                session, settings, runtime.tokens, message_id=new_id, list_unsubscribe=new_header
            )
            assert (now.subscriber_id, now.blast_id, now.evidence) == (
                sub_id,
                78,
                "list-unsubscribe",
            )
    finally:
        await runtime.close()
