"""Right of access and erasure: the export has everything, the erase leaves nothing behind.

"Nothing behind" is checked the blunt way: every column of every table in the
database, reflected from the live schema, must no longer contain the address or
the name. Then the suppression list keeps the address from being imported again,
also after the secret key was rotated.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from helpers import editor_token, sql, subscriber, write_csv
from pydantic import SecretStr
from sqlalchemy import MetaData, insert, select

from mailer.config import Settings, load_settings
from mailer.db import make_engine, utcnow
from mailer.importer import ImportOptions, import_csv
from mailer.models import Blast, Delivery, Statement
from mailer.privacy import email_hash, email_hashes

ADDRESS = "erase.me@example.org"
NAME = "Erasmus Uniquename"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def every_value(settings: Settings) -> list[tuple[str, str, str]]:
    """(table, column, value as text) for every cell of every table in the database."""
    engine = make_engine(settings.database_url)
    out = []
    try:
        async with engine.connect() as conn:
            meta = MetaData()
            await conn.run_sync(meta.reflect)
            for table in meta.sorted_tables:
                for row in await conn.execute(select(table)):
                    for column, value in zip(table.columns, row, strict=True):
                        if value is not None:
                            out.append((table.name, column.name, str(value)))
    finally:
        await engine.dispose()
    return out


async def seed_with_history(settings: Settings, tmp_path: Path) -> tuple[int, int]:
    """Two confirmed subscribers with events, one blast delivered to both, the relay's words."""
    rows = [["Erase.Me@Example.org", NAME], ["keep@example.org", "Keeper"]]
    opts = ImportOptions(confirmed=True, consent_source="petition")
    await import_csv(settings, write_csv(tmp_path / "s.csv", ["email", "name"], rows), opts)
    target = await subscriber(settings, ADDRESS)
    keep = await subscriber(settings, "keep@example.org")
    assert target is not None and keep is not None
    now = utcnow()
    engine = make_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            statement_id = (
                await conn.execute(
                    insert(Statement).returning(Statement.id),
                    [
                        {
                            "title": "T",
                            "body_markdown": "b",
                            "body_html": "<p>b</p>",
                            "body_text": "b",
                            "created_at": now,
                            "updated_at": now,
                        }
                    ],
                )  # fmt: skip
            ).scalar_one()
            blast_id = (
                await conn.execute(
                    insert(Blast).returning(Blast.id),
                    [
                        {
                            "statement_id": statement_id,
                            "status": "done",
                            "total": 2,
                            "policy_failures": 0,
                            "created_at": now,
                            "reason": f"paused after 10 policy rejections (last: 550 <{ADDRESS}>)",
                        }
                    ],
                )  # fmt: skip
            ).scalar_one()
            await conn.execute(
                insert(Delivery),
                [
                    {"blast_id": blast_id, "subscriber_id": target.id, "status": "failed",
                     "attempts": 1, "last_code": 550, "sent_at": None,
                     "last_error": f"5.1.1 <{ADDRESS}>: mailbox unavailable"},
                    {"blast_id": blast_id, "subscriber_id": keep.id, "status": "sent",
                     "attempts": 1, "last_code": 250, "last_error": None, "sent_at": now},
                ],
            )  # fmt: skip
    finally:
        await engine.dispose()
    return target.id, blast_id


async def test_export_then_erase_leaves_no_trace(
    app_client: httpx.AsyncClient, settings: Settings, tmp_path: Path
) -> None:
    sub_id, blast_id = await seed_with_history(settings, tmp_path)
    token = await editor_token(settings)
    url = f"/api/subscribers/{sub_id}"

    assert (await app_client.get(f"{url}/export")).status_code == 401
    r = await app_client.get(f"{url}/export", headers=auth(token))
    assert r.status_code == 200, r.text
    data = r.json()
    assert (data["email"], data["name"], data["status"]) == (ADDRESS, NAME, "confirmed")
    assert data["consent"]["source"] == "petition" and data["consent"]["at"]
    assert [e["kind"] for e in data["events"]] == ["imported"]
    assert data["deliveries"] == [
        {"blast_id": blast_id, "status": "failed", "attempts": 1, "sent_at": None,
         "last_code": 550, "last_error": f"5.1.1 <{ADDRESS}>: mailbox unavailable"}
    ]  # fmt: skip

    assert (await app_client.delete(url)).status_code == 401
    assert (await app_client.delete(url, headers=auth("not-a-token"))).status_code == 403
    assert any(ADDRESS in v or NAME in v for _, _, v in await every_value(settings))
    r = await app_client.delete(url, headers=auth(token))
    assert r.status_code == 204 and r.content == b""

    leaks = [
        (t, c) for t, c, v in await every_value(settings)
        if ADDRESS in v.lower() or "erasmus" in v.lower() or "uniquename" in v.lower()
    ]  # fmt: skip
    assert leaks == []
    assert (await app_client.get(f"{url}/export", headers=auth(token))).status_code == 404
    assert (await app_client.get(url, headers=auth(token))).status_code == 404
    assert (await app_client.delete(url, headers=auth(token))).status_code == 404
    # The delivery counts survive, anonymised; the other subscriber is untouched.
    rows = await sql(settings, "SELECT subscriber_id, status FROM deliveries ORDER BY id")
    assert rows[0] == (None, "failed") and rows[1][1] == "sent"
    keep = await subscriber(settings, "keep@example.org")
    assert keep is not None and keep.name == "Keeper"
    assert await sql(settings, "SELECT email_hash, reason FROM suppressions") == [
        (email_hash(settings, ADDRESS), "erased")
    ]


async def test_erased_address_is_refused_by_imports_also_after_key_rotation(
    app_client: httpx.AsyncClient, settings: Settings, tmp_path: Path
) -> None:
    sub_id, _ = await seed_with_history(settings, tmp_path)
    token = await editor_token(settings)
    erased = await app_client.delete(f"/api/subscribers/{sub_id}", headers=auth(token))
    assert erased.status_code == 204
    again = write_csv(tmp_path / "again.csv", ["email", "name"], [["ERASE.ME@example.org", NAME]])

    rotated = settings.model_copy(
        update={
            "secret_key": SecretStr("a-brand-new-secret-key-4567-0123456789"),
            "old_secret_keys": [settings.secret_key],
        }
    )
    assert email_hash(rotated, ADDRESS) != email_hash(settings, ADDRESS)
    for current in (settings, rotated):
        report = await import_csv(current, again, ImportOptions())
        assert (report.read, report.suppressed, report.imported, report.queued) == (1, 1, 0, 0)
        assert report.lines()[0] == "line 2: suppressed (erased earlier)"
        assert await subscriber(settings, ADDRESS) is None

    report = await import_csv(rotated, again, ImportOptions(allow_suppressed=True))
    assert (report.suppressed, report.imported) == (0, 1)
    back = await subscriber(settings, ADDRESS)
    assert back is not None and back.status == "pending"


def test_hash_is_keyed_normalized_and_follows_rotation() -> None:
    old_key, new_key = "old-secret-key-0123456789abcdef-1", "new-secret-key-0123456789abcdef-2"
    old = load_settings(secret_key=old_key, base_url="https://updates.example.org")
    new = load_settings(
        secret_key=new_key, old_secret_keys=old_key, base_url="https://updates.example.org"
    )
    digest = email_hash(old, ADDRESS)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert email_hash(old, " Erase.Me@EXAMPLE.org ") == digest
    assert email_hash(new, ADDRESS) != digest  # keyed: no key, no dictionary attack
    assert email_hashes(new, ADDRESS) == [email_hash(new, ADDRESS), digest]
