"""Subscriber import and export: reports that add up, merges not duplicates, round trips.

Real SQLite and PostgreSQL, real Redis (the arq queue), a real SMTP server and
worker for the confirmation mails; the report test drives `mailer` as a user does.
"""

from __future__ import annotations

import asyncio
import csv
import io
import random
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from forkrun import run_mailer
from helpers import (
    clean_redis,
    events,
    queue_settled,
    settings_env,
    sql,
    subscriber,
    table_counts,
    write_csv,
)
from smtpserver import SmtpServer

from mailer.config import Settings
from mailer.db import make_engine
from mailer.exporter import COLUMNS, export_csv
from mailer.importer import EmailNormalizer, ImportOptions, import_csv
from mailer.migrate import upgrade
from mailer.subscriptions import InvalidInput, normalize_email


async def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_mailer, list(args), env=env, timeout=120)


def report_counts(stdout: str) -> dict[str, int]:
    out = {}
    for line in stdout.splitlines():
        key, sep, value = line.rpartition(": ")
        if sep and value.isdigit() and not line.startswith("line "):
            out[key] = int(value)
    return out


BAD_KINDS = [
    (["not-an-address", "Bad", "", ""], "email"),
    (["", "No Address", "", ""], "email"),
    (["vip{n}@example.org", "Vip", "vip", ""], "status"),
    (["bell{n}@example.org", "Bell\x07", "", ""], "name"),
    (["long{n}@example.org", "N" * 250, "", ""], "name"),
    (["when{n}@example.org", "When", "", "last tuesday"], "consent_at"),
    (["space {n}@example.org", "Space", "", ""], "email"),
    (["x" * 300 + "{n}@example.org", "Long", "", ""], "email"),
]


def ten_thousand_rows() -> tuple[list[list[str]], set[int], set[str]]:
    """9,850 addresses, 100 later repeats in other case, 50 bad rows: rows, bad lines, fills."""
    rnd = random.Random(7)
    unique = [
        [f"person{i:05d}@example.org", "" if i % 97 == 0 else f"Person {i}", "", ""]
        for i in range(9850)
    ]
    after: dict[int, list[tuple[str, list[str]]]] = {}  # rows to place after unique[i]
    filled: set[str] = set()
    for i in rnd.sample(range(9850), 100):
        email, name = unique[i][0], unique[i][1]
        if not name:
            filled.add(email)
        dup = [email.upper(), "Another Name" if name else f"Filled {i}", "", ""]
        after.setdefault(rnd.randint(i, 9849), []).append(("dup", dup))
    for n in range(50):
        template, _field = BAD_KINDS[n % len(BAD_KINDS)]
        after.setdefault(rnd.randint(-1, 9849), []).append(
            ("bad", [c.format(n=n) for c in template])
        )
    rows: list[list[str]] = []
    bad_lines: set[int] = set()
    for i in range(-1, 9850):
        if i >= 0:
            rows.append(unique[i])
        for kind, row in after.get(i, []):
            rows.append(row)
            if kind == "bad":
                bad_lines.add(len(rows) + 1)  # the header is line 1
    return rows, bad_lines, filled


async def status_counts(settings: Settings) -> dict[str, int]:
    rows = await sql(settings, "SELECT status, count(*) FROM subscribers GROUP BY status")
    return {status: int(n) for status, n in rows}


@pytest.mark.slow(35)
async def test_import_report_dry_run_and_rerun(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    rows, bad_lines, filled = ten_thousand_rows()
    assert len(rows) == 10_000 and len(bad_lines) == 50
    path = write_csv(tmp_path / "list.csv", ["email", "name", "status", "consent_at"], rows)
    env = settings_env(settings)
    expected = {"read": 10_000, "imported (new)": 9850, "updated": 0, "duplicates merged": 100}
    expected |= {"skipped existing": 0, "suppressed": 0, "bad": 50}
    expected |= {"left earlier (not brought back)": 0}

    dry = await run_cli(env, "subscribers", "import", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert report_counts(dry.stdout) == expected | {"confirmation mails queued": 0}
    assert "dry run" in dry.stdout
    assert set((await table_counts(settings)).values()) == {0}
    assert await redis.zcard(settings.queue_name) == 0

    first = await run_cli(env, "subscribers", "import", str(path))
    assert first.returncode == 0, first.stderr
    counts = report_counts(first.stdout)
    assert counts == expected | {"confirmation mails queued": 9850}
    reported = {int(line.split(":")[0].removeprefix("line ")) for line in first.stdout.splitlines()
                if line.startswith("line ") and ": bad: " in line}  # fmt: skip
    assert reported == bad_lines
    assert "importing lines" in first.stderr  # the progress bar goes to stderr
    after_first = await table_counts(settings)
    assert after_first["subscribers"] == 9850 and after_first["subscriber_events"] == 9850
    assert await status_counts(settings) == {"pending": 9850}
    assert await redis.zcard(settings.queue_name) == 9850
    for email in sorted(filled)[:5]:  # a repeat fills in a missing name, never overwrites one
        sub = await subscriber(settings, email)
        assert sub is not None and sub.name is not None and sub.name.startswith("Filled")
    named = await sql(settings, "SELECT count(*) FROM subscribers WHERE name = 'Another Name'")
    assert named == [(0,)]

    again = await run_cli(env, "subscribers", "import", str(path))
    assert again.returncode == 0, again.stderr
    assert report_counts(again.stdout) == expected | {
        "imported (new)": 0,
        "skipped existing": 9850,
        "confirmation mails queued": 0,
    }
    assert await table_counts(settings) == after_first
    assert await status_counts(settings) == {"pending": 9850}
    assert await redis.zcard(settings.queue_name) == 9850


async def test_default_import_mails_confirmations_confirmed_import_does_not(
    settings: Settings, smtp: SmtpServer, start_worker: Any, tmp_path: Path
) -> None:
    await start_worker()
    plain = [[f"reader{i}@example.net", f"Reader {i}"] for i in range(20)]
    report = await import_csv(
        settings, write_csv(tmp_path / "a.csv", ["email", "name"], plain), ImportOptions()
    )
    assert (report.imported, report.queued) == (20, 20)
    await queue_settled(settings)
    assert sorted(m.rcpt for m in smtp.messages) == sorted(r[0] for r in plain)
    for email, _ in plain:
        sub = await subscriber(settings, email)
        assert sub is not None and sub.status == "pending" and sub.confirm_sent_at is not None

    petition = [[f"signer{i}@example.net", f"Signer {i}"] for i in range(20)]
    opts = ImportOptions(confirmed=True, consent_source="petition 2025")
    path = write_csv(tmp_path / "b.csv", ["email", "name"], petition)
    report = await import_csv(settings, path, opts)
    assert (report.imported, report.queued) == (20, 0)
    for email, _ in petition:
        sub = await subscriber(settings, email)
        assert sub is not None and sub.status == "confirmed"
        assert sub.consent_source == "petition 2025" and sub.consent_at is not None
        kinds = [(e.kind, e.detail) for e in await events(settings, sub.id)]
        assert len(kinds) == 1 and kinds[0][0] == "imported" and "petition 2025" in kinds[0][1]
    # The pending readers' list, now with a consent source: upgraded, still no mail.
    report = await import_csv(settings, tmp_path / "a.csv", opts)
    assert (report.imported, report.updated, report.queued) == (0, 20, 0)
    await queue_settled(settings)
    assert len(smtp.messages) == 20
    assert await status_counts(settings) == {"confirmed": 40}


async def test_merge_never_downgrades_or_resubscribes(settings: Settings, tmp_path: Path) -> None:
    header = ["email", "name", "status", "consent_source"]
    seed = [
        ["kept@example.com", "", "confirmed", "web form"],
        ["left@example.com", "Left", "unsubscribed", ""],
        ["gone@example.com", "", "bounced", ""],
    ]
    report = await import_csv(
        settings, write_csv(tmp_path / "s.csv", header, seed), ImportOptions()
    )
    assert (report.imported, report.queued, report.bad) == (3, 0, 0)
    later = [
        ["KEPT@example.com", "Kept Name", "unsubscribed", ""],
        ["left@example.com", "Left Again", "", ""],
        ["gone@example.com", "Gone", "pending", ""],
    ]
    opts = ImportOptions(confirmed=True, consent_source="old list")
    report = await import_csv(settings, write_csv(tmp_path / "l.csv", header, later), opts)
    assert (report.read, report.updated, report.left, report.imported) == (3, 1, 2, 0)
    assert report.balanced
    text = "\n".join(report.lines())
    assert "line 3: skipped: unsubscribed earlier" in text
    assert "line 4: skipped: bounced earlier" in text
    assert "line 2: kept confirmed" in text
    kept = await subscriber(settings, "kept@example.com")
    assert kept is not None and (kept.status, kept.name) == ("confirmed", "Kept Name")
    assert kept.consent_source == "web form"
    left = await subscriber(settings, "left@example.com")
    assert left is not None and (left.status, left.name) == ("unsubscribed", "Left")
    gone = await subscriber(settings, "gone@example.com")
    assert gone is not None and gone.status == "bounced" and gone.name is None


def parse_export(text: str) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    return sorted(rows, key=lambda r: r["email"])


@pytest.mark.slow(12)
async def test_export_import_round_trip_into_fresh_database(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    header = ["email", "name", "status", "consent_at", "consent_ip", "consent_source"]
    people = [
        ["ada@example.com", 'Ada "The Countess", Lovelace', "confirmed", "2024-03-01T10:00:00Z",
         "198.51.100.7", "double opt-in"],
        ["zoe@example.com", "Zoë Ørsted", "", "", "", ""],
        ["bob@example.com", "", "unsubscribed", "", "", ""],
        ["cy@example.com", "Cy", "bounced", "", "", ""],
        ["dee@example.com", "Dee", "confirmed", "", "", "street stall"],
    ]  # fmt: skip
    await import_csv(settings, write_csv(tmp_path / "in.csv", header, people), ImportOptions())
    exported = await run_cli(settings_env(settings), "subscribers", "export")
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.splitlines()[0] == ",".join(COLUMNS)
    before = parse_export(exported.stdout)
    assert [(r["email"], r["status"]) for r in before] == [
        ("ada@example.com", "confirmed"),
        ("bob@example.com", "unsubscribed"),
        ("cy@example.com", "bounced"),
        ("dee@example.com", "confirmed"),
        ("zoe@example.com", "pending"),
    ]
    only = await run_cli(settings_env(settings), "subscribers", "export", "--status", "confirmed")
    assert [r["email"] for r in parse_export(only.stdout)] == ["ada@example.com", "dee@example.com"]

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
        assert (report.read, report.imported, report.bad) == (5, 5, 0)
        out = io.StringIO()
        assert await export_csv(engine, out) == 5
        assert parse_export(out.getvalue()) == before  # every column, every status
    finally:
        await engine.dispose()
        await clean_redis(redis, fresh.queue_name)


@pytest.mark.slow(30)
async def test_cli_refuses_bad_invocations_in_one_line(tmp_path: Path) -> None:
    env = settings_env_defaults(tmp_path)
    good = write_csv(tmp_path / "ok.csv", ["email"], [["a@example.com"]])
    noemail = write_csv(tmp_path / "names.csv", ["name", "phone"], [["Ada", "1"]])
    huge = tmp_path / "huge.csv"
    with huge.open("wb") as fh:  # sparse: costs no disk
        fh.truncate(201 * 1024 * 1024)
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("email,name\nj@example.com,Jos\xe9\n".encode("latin-1"))

    # Independent invocations: run side by side, each checked on its own below.
    confirmed, missing, no_email, too_big, not_utf8, bad_status = await asyncio.gather(
        run_cli(env, "subscribers", "import", str(good), "--confirmed"),
        run_cli(env, "subscribers", "import", str(tmp_path / "missing.csv")),
        run_cli(env, "subscribers", "import", str(noemail)),
        run_cli(env, "subscribers", "import", str(huge)),
        run_cli(env, "subscribers", "import", str(latin)),
        run_cli(env, "subscribers", "export", "--status", "vip"),
    )

    r = confirmed
    assert r.returncode == 2 and "--consent-source" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    r = missing
    assert (
        r.returncode != 0 and r.stderr.strip() == f"error: {tmp_path / 'missing.csv'}: no such file"
    )

    r = no_email
    assert r.returncode != 0 and "no 'email' column" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    r = too_big
    assert r.returncode != 0 and "200 MB import limit" in r.stderr

    r = not_utf8
    assert r.returncode != 0 and "line 2 is not UTF-8" in r.stderr

    r = bad_status
    assert r.returncode == 2 and "--status must be one of" in r.stderr
    assert not (tmp_path / "never.db").exists()  # refused before touching anything


def settings_env_defaults(tmp_path: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env["MAILER_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'never.db'}"
    env["MAILER_QUEUE_NAME"] = f"test-{uuid.uuid4().hex[:10]}"
    env["MAILER_SECRET_KEY"] = "import-test-secret-key-0123456789abcdef"
    env["MAILER_BASE_URL"] = "https://updates.example.org"
    return env


def test_remembered_domains_give_the_same_answers_as_full_validation() -> None:
    domains = ["Example.ORG", "example.org", "bücher.de", "localhost", "-bad.org", "a.b.co"]
    locals_ = ["A.B", "a..b", ".a", "a.", "x" * 64, "x" * 65, "a+tag", '"quo ted"', "ü",
               "a b", "a\x00b", "o'neil", "", "y" * 60 + "." + "z" * 3]  # fmt: skip
    cases = [f"{lp}@{d}" for d in domains for lp in locals_]
    cases += [" Padded@Example.ORG ", "no-at-sign", "a@b@example.org", "a@" + "d" * 250 + ".org"]

    def verdict(fn: Any, raw: str) -> str:
        try:
            return str(fn(raw))
        except InvalidInput:
            return "invalid"

    fast = EmailNormalizer()
    for d in domains:
        verdict(fast, f"warm@{d}")
    assert [verdict(fast, c) for c in cases] == [verdict(normalize_email, c) for c in cases]
    assert fast.domains  # the fast path was taken
