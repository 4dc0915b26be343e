"""The `mailer` command as ops and editors run it: subprocesses, real databases."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import mailer, sql
from smtpserver import SmtpServer

from mailer.config import Settings

MAILER = str(Path(sys.executable).parent / "mailer")


async def mailers(
    settings: Settings, *runs: tuple[list[str], dict[str, str]]
) -> list[subprocess.CompletedProcess[str]]:
    """Independent invocations side by side (each one is mostly a process start-up)."""
    return list(
        await asyncio.gather(
            *(asyncio.to_thread(mailer, settings, *args, **env) for args, env in runs)
        )
    )


async def test_editors_add_prints_the_token_once(
    settings: Settings, app_client: httpx.AsyncClient
) -> None:
    done = mailer(settings, "editors", "add", "Ada")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip().splitlines()[-1]
    assert token.startswith("mlr_") and " " not in token
    rows = await sql(settings, "SELECT name, token_hash FROM editors")
    assert rows[0][0] == "Ada" and token not in rows[0][1] and len(rows[0][1]) == 64
    r = await app_client.get("/api/blasts", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    again = mailer(settings, "editors", "add", "Ada")
    assert again.returncode == 1
    assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr


async def test_publish_and_blast_from_a_markdown_file(settings: Settings, tmp_path: Path) -> None:
    md = tmp_path / "statement.md"
    md.write_text("---\ntitle: From the CLI\nauthor: Press office\n---\nHello **all**.\n")
    done = mailer(settings, "publish", str(md), "--blast", "--at", "2099-01-01T09:00:00+00:00")
    assert done.returncode == 0, done.stderr
    assert "statement 1 published" in done.stdout and "blast 1 scheduled" in done.stdout
    rows = await sql(settings, "SELECT title, author, body_html FROM statements")
    assert rows[0][0] == "From the CLI" and rows[0][1] == "Press office"
    assert "<strong>all</strong>" in rows[0][2]
    assert (await sql(settings, "SELECT status FROM blasts"))[0][0] == "scheduled"

    heading = tmp_path / "h.md"
    heading.write_text("# Heading title\n\nBody.\n")
    done = mailer(settings, "publish", str(heading))
    assert done.returncode == 0 and "Heading title" in done.stdout


@pytest.mark.slow(10)
async def test_publish_errors_name_the_problem_and_write_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.md"
    empty.write_text("no heading and no front matter\n")
    cases = [
        ([str(tmp_path / "missing.md")], "cannot read"),
        ([str(empty)], "title"),
        ([str(empty), "--at", "2099-01-01T09:00:00+00:00"], "--at needs --blast"),
        ([str(empty), "--blast", "--at", "next tuesday"], "--at"),
        ([str(empty), "--blast", "--at", "2099-01-01T09:00:00"], "timezone"),
    ]
    runs = await mailers(settings, *((["publish", *args], {}) for args, _ in cases))
    for (args, fragment), done in zip(cases, runs, strict=True):
        assert done.returncode != 0, args
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], (args, done.stderr)
    assert (await sql(settings, "SELECT count(*) FROM statements"))[0][0] == 0


async def test_bad_settings_stop_start_up_with_one_line(settings: Settings) -> None:
    rate, secret, domains, security = await mailers(
        settings,
        (["migrate"], {"MAILER_RATE_PER_SECOND": "fast"}),
        (["migrate"], {"MAILER_ENV": "production", "MAILER_SECRET_KEY": ""}),
        (["migrate"], {"MAILER_DOMAIN_RATES": "gmail.com:20"}),
        (["migrate"], {"MAILER_SMTP_SECURITY": "ssl3"}),
    )
    done = rate
    assert done.returncode == 2
    assert done.stderr.strip().startswith("configuration error: MAILER_RATE_PER_SECOND")
    assert "Traceback" not in done.stderr
    done = secret
    assert done.returncode == 2 and "MAILER_SECRET_KEY" in done.stderr
    done = domains
    assert done.returncode == 2 and "MAILER_DOMAIN_RATES" in done.stderr
    done = security
    assert done.returncode == 2 and "MAILER_SMTP_SECURITY" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow(20)
async def test_send_test_and_migrate(settings: Settings, smtp: SmtpServer, tmp_path: Path) -> None:
    fresh = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    done, bad, down, migrated = await mailers(
        settings,
        (["send-test", "ops@example.com"], {}),
        (["send-test", "not-an-address"], {}),
        (["send-test", "ops@example.com"], {"MAILER_SMTP_PORT": "1"}),
        (["migrate"], {"MAILER_DATABASE_URL": fresh}),
    )
    assert done.returncode == 0, done.stderr
    assert smtp.wait_for(1)[0].rcpt == "ops@example.com"
    assert bad.returncode == 1 and "email" in bad.stderr
    done = migrated
    assert done.returncode == 0 and "up to date" in done.stdout
    again = await asyncio.to_thread(mailer, settings, "migrate", MAILER_DATABASE_URL=fresh)
    assert again.returncode == 0
    assert down.returncode == 1 and "refused" in down.stderr
