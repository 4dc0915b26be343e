"""Who left stays gone: an unsubscribed, bounced or erased address comes back only by
its owner's click on a confirmation link mailed after they left (docs/security.md).

Not by a stranger's sign-up, not by a `--confirmed` import, not by a confirmation link
from before the latest unsubscribe or bounce.
"""

from __future__ import annotations

import asyncio
import csv
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from forkrun import run_mailer
from helpers import (
    editor_token,
    events,
    find_link,
    seed_subscribers,
    settings_env,
    sql,
    subscriber,
    text_body,
    wait_until,
)
from smtpserver import SmtpServer
from sqlalchemy import text, update

from mailer.config import Settings
from mailer.db import make_engine, utcnow
from mailer.migrate import upgrade
from mailer.models import Subscriber
from mailer.tokens import Tokens

MAILER = str(Path(sys.executable).parent / "mailer")
ADA = "ada@example.com"
# A new confirmation mail for every sign-up, so the stranger's one reaches the owner.
NO_COOLDOWN = pytest.mark.parametrize("settings_overrides", [{"confirm_resend_s": 0}])


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def blast_and_wait(client: httpx.AsyncClient, token: str, title: str) -> None:
    r = await client.post(
        "/api/statements", json={"title": title, "body_markdown": "News."}, headers=auth(token)
    )
    assert r.status_code == 201, r.text
    r = await client.post("/api/blasts", json={"statement_id": r.json()["id"]}, headers=auth(token))
    assert r.status_code == 202, r.text
    blast_id = r.json()["id"]

    async def done() -> bool:
        status = (await client.get(f"/api/blasts/{blast_id}", headers=auth(token))).json()
        return bool(status["status"] == "done")

    await wait_until(done, timeout=60)


def statements_to(smtp: SmtpServer, email: str, title: str) -> int:
    return sum(1 for m in smtp.recorder.to(email) if m.message["Subject"] == title)


def confirm_links(smtp: SmtpServer, email: str) -> list[str]:
    return [
        urlsplit(find_link(text_body(m.message), "confirm")).path
        for m in smtp.recorder.to(email)
        if "/confirm/" in text_body(m.message)
    ]


async def import_confirmed(settings: Settings, path: Path, *extra: str) -> str:
    done = await asyncio.to_thread(
        run_mailer,
        ["subscribers", "import", str(path), "--confirmed", "--consent-source", "old list",
         *extra],
        env=settings_env(settings),
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


async def set_row(settings: Settings, sub_id: int, **values: Any) -> None:
    engine = make_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(update(Subscriber).where(Subscriber.id == sub_id).values(**values))
    finally:
        await engine.dispose()


def write_list(path: Path, emails: list[str]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["email", "name"])
        writer.writerows([e, "From an old list"] for e in emails)
    return path


@NO_COOLDOWN
async def test_after_one_click_unsubscribe_neither_a_stranger_nor_an_import_brings_them_back(
    app_client: httpx.AsyncClient,
    smtp: SmtpServer,
    settings: Settings,
    start_worker: Any,
    tmp_path: Path,
) -> None:
    await start_worker()
    token = await editor_token(settings)
    await seed_subscribers(settings, confirmed=1)  # someone who stays, so blasts go out
    control = (await sql(settings, "SELECT email FROM subscribers"))[0][0]

    # Ada signs up, confirms, gets a statement and leaves with one click.
    r = await app_client.post("/subscribe", data={"email": ADA, "name": "Ada"})
    accepted = r.content
    await wait_until(lambda: confirm_links(smtp, ADA))
    first_link = confirm_links(smtp, ADA)[0]
    assert (await app_client.post(first_link)).status_code == 200
    await blast_and_wait(app_client, token, "First statement")
    assert statements_to(smtp, ADA, "First statement") == 1
    mail = next(m for m in smtp.recorder.to(ADA) if m.message["Subject"] == "First statement")
    one_click = urlsplit(find_link(text_body(mail.message), "unsubscribe")).path
    r = await app_client.post(
        one_click,
        content=b"List-Unsubscribe=One-Click",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200
    await asyncio.sleep(1.1)  # signed links carry whole seconds: the next ones come later

    # A stranger posts her address: the same answer as for anyone, and she stays gone.
    r = await app_client.post("/subscribe", data={"email": ADA, "name": "Not Ada"})
    assert r.status_code == 202 and r.content == accepted
    await wait_until(lambda: len(confirm_links(smtp, ADA)) == 2)  # the mail goes to Ada only
    ada = await subscriber(settings, ADA)
    assert ada is not None and (ada.status, ada.name) == ("unsubscribed", "Ada")
    assert ada.resubscribe_requested_at is not None

    # An old list imported as confirmed: reported as left, nothing changes.
    out = await import_confirmed(settings, write_list(tmp_path / "old.csv", [ADA]))
    assert "left earlier (not brought back): 1" in out
    assert "imported (new): 0" in out and "updated: 0" in out
    ada = await subscriber(settings, ADA)
    assert ada is not None and ada.status == "unsubscribed"

    # The next blast reaches everyone else, and not her.
    await blast_and_wait(app_client, token, "Second statement")
    assert statements_to(smtp, control, "Second statement") == 1
    assert statements_to(smtp, ADA, "Second statement") == 0

    # Her old confirmation link, from before she left, no longer works.
    r = await app_client.post(first_link)
    assert r.status_code == 400 and "no longer valid" in r.text
    assert (await subscriber(settings, ADA)).status == "unsubscribed"  # type: ignore[union-attr]

    # Her own click on the new link brings her back.
    new_link = confirm_links(smtp, ADA)[1]
    assert new_link != first_link
    assert (await app_client.post(new_link)).status_code == 200
    ada = await subscriber(settings, ADA)
    assert ada is not None and ada.status == "confirmed" and ada.resubscribe_requested_at is None
    kinds = [e.kind for e in await events(settings, ada.id)]
    assert kinds.count("confirmed") == 2
    await blast_and_wait(app_client, token, "Third statement")
    assert statements_to(smtp, ADA, "Third statement") == 1


async def test_a_link_from_before_the_latest_of_unsubscribe_and_bounce_is_refused(
    app_client: httpx.AsyncClient, settings: Settings
) -> None:
    """Unsubscribed long ago, bounced recently: only a link newer than the bounce works."""
    await seed_subscribers(settings, confirmed=1)
    sub_id, email = (await sql(settings, "SELECT id, email FROM subscribers"))[0]
    now = utcnow()
    await set_row(
        settings,
        sub_id,
        status="bounced",
        unsubscribed_at=now - timedelta(days=30),
        bounced_at=now - timedelta(days=1),
        resubscribe_requested_at=now,
    )
    tokens = Tokens(settings.signing_keys, settings.confirm_token_ttl_s)
    between = tokens.confirm(sub_id, now=time.time() - 5 * 86400)  # after the unsubscribe only
    r = await app_client.post(f"/confirm/{between}")
    assert r.status_code == 400 and "no longer valid" in r.text
    assert (await subscriber(settings, email)).status == "bounced"  # type: ignore[union-attr]

    fresh = tokens.confirm(sub_id)  # mailed after the bounce
    assert (await app_client.post(f"/confirm/{fresh}")).status_code == 200
    assert (await subscriber(settings, email)).status == "confirmed"  # type: ignore[union-attr]


async def test_a_link_alone_does_not_bring_back_someone_who_did_not_sign_up_again(
    app_client: httpx.AsyncClient, settings: Settings
) -> None:
    await seed_subscribers(settings, unsubscribed=1)
    sub_id, email = (await sql(settings, "SELECT id, email FROM subscribers"))[0]
    await set_row(settings, sub_id, unsubscribed_at=utcnow() - timedelta(days=3))
    link = Tokens(settings.signing_keys, settings.confirm_token_ttl_s).confirm(sub_id)
    r = await app_client.post(f"/confirm/{link}")
    assert r.status_code == 400
    assert (await subscriber(settings, email)).status == "unsubscribed"  # type: ignore[union-attr]


async def test_imports_never_confirm_an_erased_address(
    app_client: httpx.AsyncClient,
    smtp: SmtpServer,
    settings: Settings,
    start_worker: Any,
    tmp_path: Path,
) -> None:
    await start_worker()
    token = await editor_token(settings)
    for email in ("erin@example.com", "eve@example.com"):
        await app_client.post("/subscribe", json={"email": email})
        await wait_until(lambda e=email: smtp.recorder.to(e))  # type: ignore[misc]
        sub = await subscriber(settings, email)
        assert sub is not None
        r = await app_client.delete(f"/api/subscribers/{sub.id}", headers=auth(token))
        assert r.status_code == 204

    # A stranger signs Erin up again (pending: only her click confirms), then an old list.
    await app_client.post("/subscribe", json={"email": "erin@example.com"})
    listed = write_list(tmp_path / "old.csv", ["erin@example.com", "eve@example.com"])
    out = await import_confirmed(settings, listed)
    assert "left earlier (not brought back): 1" in out and "suppressed: 1" in out
    erin = await subscriber(settings, "erin@example.com")
    assert erin is not None and erin.status == "pending"
    assert await subscriber(settings, "eve@example.com") is None

    # Even --allow-suppressed re-adds Eve as pending, asking her, never as confirmed.
    out = await import_confirmed(settings, listed, "--allow-suppressed")
    assert "erased earlier: imported as pending, not confirmed" in out
    eve = await subscriber(settings, "eve@example.com")
    assert eve is not None and eve.status == "pending" and eve.consent_source is None
    await wait_until(lambda: len(smtp.recorder.to("eve@example.com")) == 2)  # they are asked
    statuses = dict(await sql(settings, "SELECT email, status FROM subscribers"))
    assert "confirmed" not in statuses.values()


async def test_migration_puts_rows_flipped_by_the_old_code_back(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        await upgrade(engine, "0002")
        now = utcnow()
        async with engine.begin() as conn:
            insert = Subscriber.__table__.insert()  # only the columns given: 0002's
            day = timedelta(days=1)
            rows = [
                ("flipped-unsub@example.com", "pending", now - day, None),
                ("flipped-bounce@example.com", "pending", now - 2 * day, now - day),
                ("never-left@example.com", "pending", None, None),
                ("back@example.com", "confirmed", now - day, None),
            ]
            for email, status, unsub, bounce in rows:
                values = {"email": email, "status": status, "created_at": now}
                values |= {"updated_at": now, "confirm_sent_at": now}
                await conn.execute(
                    insert.values(unsubscribed_at=unsub, bounced_at=bounce, **values)
                )
        await upgrade(engine)
        async with engine.connect() as conn:
            got = {
                email: (status, requested is not None)
                for email, status, requested in await conn.execute(
                    text("SELECT email, status, resubscribe_requested_at FROM subscribers")
                )
            }
        assert got == {
            "flipped-unsub@example.com": ("unsubscribed", True),
            "flipped-bounce@example.com": ("bounced", True),
            "never-left@example.com": ("pending", False),
            "back@example.com": ("confirmed", False),
        }
    finally:
        await engine.dispose()
