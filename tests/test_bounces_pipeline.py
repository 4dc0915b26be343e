"""Bounces and complaints end to end: a real blast, real-shaped DSNs and ARF built from the
messages the SMTP server received, fed through each way in (the ingest call, the
``mailer bounces ingest`` command, the ``mailer bounces serve`` SMTP listener)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest
from bounce_reports import arf, exim_dsn, exim_prose, out_of_office, postfix_dsn, tamper
from helpers import (
    blast,
    editor_token,
    publish,
    seed_subscribers,
    settings_env,
    sql,
    subscriber,
    wait_status,
    wait_until,
)
from smtpserver import SmtpServer, free_port
from typer.testing import CliRunner

from mailer.bounces import ingest
from mailer.cli import app
from mailer.config import Settings
from mailer.importer import import_csv
from mailer.importer.rows import ImportOptions
from mailer.privacy import email_hash
from mailer.runtime import Runtime

MAILER = str(Path(sys.executable).parent / "mailer")
VERP = {"verp_domain": "bounce.test"}
COMPLAINTS = "complaints@bounce.test"

Deliver = Callable[[bytes, str], Awaitable[str]]


async def statuses(settings: Settings, emails: list[str]) -> list[str]:
    out = []
    for email in emails:
        sub = await subscriber(settings, email)
        assert sub is not None
        out.append(sub.status)
    return out


async def acceptance(
    settings: Settings,
    app_client: httpx.AsyncClient,
    smtp: SmtpServer,
    start_worker: Any,
    deliver: Deliver,
) -> None:
    """Blast to 10; 3 hard, 1 soft, 1 complaint, 1 forgery; the next blast reaches 6."""
    a = sorted((await seed_subscribers(settings, confirmed=10))["confirmed"])
    token = await editor_token(settings)
    await start_worker()
    first = await blast(app_client, token, await publish(app_client, token))
    await wait_status(app_client, token, first, "done")
    got = {m.rcpt: m for m in smtp.messages}
    assert sorted(got) == a
    assert all(m.mail_from.startswith("bounces+") for m in got.values())
    assert all(m.mail_from.endswith("@bounce.test") for m in got.values())

    def env(i: int) -> str:
        return got[a[i]].mail_from

    lines = [
        await deliver(postfix_dsn(got[a[0]].data, a[0], env(0)), env(0)),
        await deliver(exim_dsn(got[a[1]].data, a[1], env(1)), env(1)),
        await deliver(exim_prose(got[a[2]].data, a[2], env(2)), env(2)),
        await deliver(
            postfix_dsn(
                got[a[3]].data,
                a[3],
                env(3),
                status="4.2.2",
                action="delayed",
                diagnostic=f"smtp; 452 4.2.2 <{a[3]}>: Mailbox full",
            ),
            env(3),
        ),
        await deliver(arf(got[a[4]].data), COMPLAINTS),
        # A forgery: a tampered tag, no signed headers, a real subscriber named.
        await deliver(
            postfix_dsn(
                f"From: x@example.net\r\nTo: {a[6]}\r\nSubject: hi\r\n\r\nhi\r\n".encode(),
                a[6],
                tamper(env(5)),
                whole_message=False,
            ),
            tamper(env(5)),
        ),
        await deliver(out_of_office(env(7)), env(7)),
    ]
    assert [line.split()[0] for line in lines] == [
        "hard", "hard", "hard", "soft", "complaint", "unmatched", "ignored",
    ]  # fmt: skip
    assert f"in blast {first}" in lines[0] and "bounced" in lines[0]
    assert "VERP tag does not verify" in lines[5] and "nothing changed" in lines[5]
    assert "soft bounce 1 of 3" in lines[3]

    assert await statuses(settings, a) == [
        "bounced", "bounced", "bounced", "confirmed", "unsubscribed",
        "confirmed", "confirmed", "confirmed", "confirmed", "confirmed",
    ]  # fmt: skip
    rows = await sql(
        settings,
        "SELECT kind, subscriber_id, blast_id, evidence, status FROM bounce_events ORDER BY id",
    )
    ids = {e: (await subscriber(settings, e)).id for e in a}  # type: ignore[union-attr]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("hard", ids[a[0]], first),
        ("hard", ids[a[1]], first),
        ("hard", ids[a[2]], first),
        ("soft", ids[a[3]], first),
        ("complaint", ids[a[4]], first),
        ("unmatched", None, None),
        ("ignored", ids[a[7]], first),
    ]
    assert rows[1][4] == "5.1.1"  # Exim's generic 5.0.0 read from its diagnostic
    assert rows[4][3] == "list-unsubscribe"  # no VERP on a feedback loop: the signed header
    events = await sql(
        settings,
        "SELECT kind, detail FROM subscriber_events WHERE subscriber_id = :i ORDER BY id",
        i=ids[a[4]],
    )
    assert events[-1][0] == "unsubscribed" and events[-1][1].startswith("complaint")
    suppressed = await sql(settings, "SELECT email_hash, reason FROM suppressions")
    assert suppressed == [(email_hash(settings, a[4]), "complaint")]

    # The same DSN again changes nothing and stores nothing.
    again = await deliver(postfix_dsn(got[a[0]].data, a[0], env(0), queue_id="4FDUP"), env(0))
    assert again.split()[0] == "hard"
    dup = await deliver(postfix_dsn(got[a[0]].data, a[0], env(0), queue_id="4FDUP"), env(0))
    assert dup.startswith("duplicate")
    assert len(await sql(settings, "SELECT id FROM bounce_events")) == len(rows) + 1

    # An import cannot bring the complainer back.
    csv = Path(settings.dev_inbox_dir).parent / "back.csv"
    csv.write_text(f"email,name\n{a[4]},Again\n")
    await import_csv(settings, csv, ImportOptions(confirmed=True))
    assert (await statuses(settings, [a[4]])) == ["unsubscribed"]

    smtp.recorder.clear()
    second = await blast(app_client, token, await publish(app_client, token, title="Next"))
    await wait_status(app_client, token, second, "done")
    assert smtp.recorder.counts() == {e: 1 for e in (a[3], a[5], a[6], a[7], a[8], a[9])}


@pytest.mark.parametrize("settings_overrides", [VERP])
async def test_bounces_through_ingest(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    runtime = Runtime.create(settings)

    async def deliver(raw: bytes, envelope_to: str) -> str:
        result = await ingest(runtime, raw, source="cli", envelope_to=envelope_to)
        return result.summary

    try:
        await acceptance(settings, app_client, smtp, start_worker, deliver)
    finally:
        await runtime.close()


@pytest.mark.parametrize("settings_overrides", [VERP])
async def test_bounces_through_the_ingest_command(
    app_client: httpx.AsyncClient,
    smtp: SmtpServer,
    settings: Settings,
    start_worker: Any,
    tmp_path: Path,
) -> None:
    env = settings_env(settings)
    calls = iter(range(100))
    runner = CliRunner()

    async def deliver(raw: bytes, envelope_to: str) -> str:
        n = next(calls)
        if n == 0:  # as Postfix's pipe(8) with flags=D: the recipient in Delivered-To; a file
            path = tmp_path / "dsn.eml"
            path.write_bytes(
                f"Delivered-To: {envelope_to}\n".encode() + raw.replace(b"\r\n", b"\n")
            )
            args, data = ["bounces", "ingest", str(path)], b""
        else:
            args, data = ["bounces", "ingest", "--envelope-to", envelope_to], raw
            args += ["-"] if n % 2 else []  # '-' and no argument both read standard input
        if n < 2:  # the real command, as an MTA runs it
            done = await asyncio.to_thread(
                subprocess.run, [MAILER, *args], input=data, env=env, capture_output=True
            )
            code, out, err = done.returncode, done.stdout.decode(), done.stderr.decode()
        else:  # the same command in-process: a process start-up costs seconds on a busy CI
            result = await asyncio.to_thread(runner.invoke, app, args, input=data, env=env)
            code, out, err = result.exit_code, result.stdout, result.stderr
        assert code == 0, (out, err)
        assert out.count("\n") == 1 and err == "", (out, err)
        return out.strip()

    await acceptance(settings, app_client, smtp, start_worker, deliver)


@pytest.fixture
async def listener(settings: Settings, tmp_path: Path) -> AsyncIterator[int]:
    """``mailer bounces serve`` as a process, on a free port."""
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [MAILER, "bounces", "serve", "--port", str(port)],
        env=settings_env(settings),
        stdout=subprocess.PIPE,
        stderr=log,
    )

    async def up() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        return True

    try:
        await wait_until(up, timeout=30, step=0.1)
        assert proc.stdout is not None
        first = (await asyncio.to_thread(proc.stdout.readline)).decode()
        assert f"listening on 127.0.0.1:{port}" in first and COMPLAINTS in first
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()


async def send_null_sender(port: int, rcpt: str, raw: bytes) -> Any:
    """As a reporting MTA sends a DSN: ``MAIL FROM:<>``."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30) as client:
        return await client.sendmail("", [rcpt], raw)


@pytest.mark.parametrize("settings_overrides", [VERP])
async def test_bounces_through_the_smtp_listener(
    app_client: httpx.AsyncClient,
    smtp: SmtpServer,
    settings: Settings,
    start_worker: Any,
    listener: int,
) -> None:
    async def deliver(raw: bytes, envelope_to: str) -> str:
        before = await sql(settings, "SELECT count(*) FROM bounce_events")
        reply = await send_null_sender(listener, envelope_to, raw)
        assert reply[0] == {}, reply  # accepted
        rows = await sql(
            settings, "SELECT kind, blast_id, note FROM bounce_events ORDER BY id DESC"
        )
        if len(rows) == before[0][0]:
            return "duplicate"
        kind, blast_id, note = rows[0]
        return f"{kind} in blast {blast_id}: {note}"

    # Anything but the bounce and complaint addresses is refused at RCPT.
    for rcpt in ("alice@bounce.test", "bounces+1-x@elsewhere.test", "bounces@bounce.test"):
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await send_null_sender(listener, rcpt, b"Subject: x\r\n\r\nx\r\n")
    await acceptance(settings, app_client, smtp, start_worker, deliver)
