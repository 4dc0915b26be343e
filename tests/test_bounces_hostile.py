"""Garbage in: anyone can mail the bounce address. Truncated MIME, a 20 MB attachment,
1,000 recipients, 8-bit headers, nesting bombs: one clear line, exit 0 (65/66 only for
input that is not a message at all), nothing written wrongly, no crash."""

from __future__ import annotations

import asyncio
import base64
import random
import sys
from pathlib import Path

import pytest
from bounce_reports import postfix_dsn, tamper
from forkrun import run_mailer
from helpers import seed_subscribers, settings_env, sql, subscriber_ids
from typer.testing import CliRunner

from mailer.bounces.classify import kind_for
from mailer.bounces.parse import MAX_BYTES, MAX_RECIPIENTS, ReportType, parse
from mailer.cli import app
from mailer.config import Settings
from mailer.render import make_message_id
from mailer.tokens import Tokens

MAILER = str(Path(sys.executable).parent / "mailer")
VERP = {"verp_domain": "bounce.test"}


def original_for(settings: Settings, sub_id: int, email: str, attachment: int = 0) -> bytes:
    head = (
        f"From: updates@example.org\r\nTo: {email}\r\nSubject: A statement\r\n"
        f"Message-ID: {make_message_id(settings, 1, sub_id)}\r\nMIME-Version: 1.0\r\n"
    )
    if not attachment:
        return (head + "Content-Type: text/plain\r\n\r\nHello\r\n").encode()
    blob = base64.encodebytes(random.Random(1).randbytes(attachment)).replace(b"\n", b"\r\n")
    return (
        head.encode()
        + b'Content-Type: multipart/mixed; boundary="att"\r\n\r\n--att\r\n'
        + b"Content-Type: text/plain\r\n\r\nHello\r\n--att\r\n"
        + b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + blob
        + b"\r\n--att--\r\n"
    )


def nested(depth: int) -> bytes:
    parts = [
        f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(depth)
    ]
    return (
        b"From: MAILER-DAEMON@x\r\nSubject: Undelivered Mail\r\nMIME-Version: 1.0\r\n"
        + "".join(parts).encode()
    )


@pytest.mark.parametrize("settings_overrides", [VERP])
async def test_garbage_in_gives_a_line_and_changes_nothing_wrongly(
    settings: Settings, tmp_path: Path
) -> None:
    people = sorted((await seed_subscribers(settings, confirmed=5))["confirmed"])
    ids = await subscriber_ids(settings, people)
    tokens = Tokens(settings.signing_keys, settings.confirm_token_ttl_s)
    verp = {e: f"bounces+{tokens.bounce_tag(ids[e], 1)}@bounce.test" for e in people}
    env = settings_env(settings)
    runner = CliRunner()

    async def run(data: bytes, *args: str) -> tuple[int, str, str]:
        result = await asyncio.to_thread(
            runner.invoke, app, ["bounces", "ingest", *args], input=data, env=env
        )
        return result.exit_code, result.stdout, result.stderr

    # Truncated in the middle of the returned message: the report itself is whole.
    genuine = postfix_dsn(
        original_for(settings, ids[people[0]], people[0]), people[0], verp[people[0]]
    )
    code, out, err = await run(genuine[: len(genuine) - 40], "--envelope-to", verp[people[0]])
    assert (code, err) == (0, "") and out.startswith("hard DSN 550 5.1.1") and out.count("\n") == 1
    # Truncated inside the report, to a tampered address: stored as unmatched, nothing else.
    cut = genuine[: genuine.index(b"Action:") + 5]
    code, out, err = await run(cut, "--envelope-to", tamper(verp[people[1]]))
    assert (code, err) == (0, "") and out.startswith("unmatched") and "nothing changed" in out

    # 1,000 recipient blocks naming real subscribers, to the complaints address.
    blocks = "".join(
        f"Final-Recipient: rfc822; {people[i % 5]}\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
        for i in range(1000)
    )
    many = (
        "From: MAILER-DAEMON@evil.example\r\nSubject: Undelivered Mail\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nbounced\r\n--B\r\n"
        "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; evil.example\r\n\r\n"
        f"{blocks}--B--\r\n"
    ).encode()
    code, out, err = await run(many, "--envelope-to", "complaints@bounce.test")
    assert (code, err) == (0, "") and out.startswith("unmatched DSN")
    assert f"1000 recipient blocks, only the first {MAX_RECIPIENTS} read" in out
    assert "MIME parts" not in out  # report fields are not MIME parts

    # 8-bit bytes in headers and fields, a broken encoded-word, a NUL.
    eight_bit = (
        b"From: \xff\xfe Mail\xe9r <MAILER-DAEMON@x.example>\r\n"
        b"Subject: =?utf-8?B?####?= \xc3\x28\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; "
        b"boundary=Z\r\n\r\n--Z\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; \xff\r\n\r\nFinal-Recipient: rfc822; \xe9\x00@x\r\n"
        b"Action: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 \xff\xff\r\n\r\n--Z--\r\n"
    )
    code, out, err = await run(eight_bit, "--envelope-to", verp[people[2]])
    assert (code, err) == (0, "") and out.startswith("hard DSN")  # a genuine tag: it acts

    # A nesting bomb and an out-of-office reply: read, ignored.
    code, out, _ = await run(nested(5000), "--envelope-to", tamper(verp[people[3]]))
    assert code == 0 and out.count("\n") == 1
    # Not a message at all, or nothing: 65 (EX_DATAERR); a missing file: 66.
    code, out, err = await run(b"", "-")
    assert (code, out) == (65, "") and err == "error: empty input: not an email message\n"
    code, out, err = await run(random.Random(2).randbytes(3000).replace(b":", b""))
    assert code == 65 and "not an email message" in err and err.count("\n") == 1
    code, out, err = await run(b"", str(tmp_path / "missing.eml"))
    assert code == 66 and "cannot read" in err
    # The database is down: 75, "try again later", so the MTA keeps the report.
    down = env | {"MAILER_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:9/none"}
    result = await asyncio.to_thread(
        runner.invoke, app, ["bounces", "ingest", "--envelope-to", verp[people[1]]],
        input=genuine, env=down,
    )  # fmt: skip
    assert result.exit_code == 75, result.output
    assert "try again later" in result.stderr and result.stderr.count("\n") == 1

    # 20 MB attachment, through the real command on standard input: all of it is read.
    huge = postfix_dsn(
        original_for(settings, ids[people[4]], people[4], attachment=15 * 1024 * 1024),
        people[4],
        verp[people[4]],
    )
    assert len(huge) > 20 * 1024 * 1024
    done = await asyncio.to_thread(
        run_mailer,
        ["bounces", "ingest", "--envelope-to", verp[people[4]]],
        input=huge,
        env=env,
        text=False,
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.decode()
    assert (
        line.startswith("hard DSN") and f"only the first {MAX_BYTES} of {len(huge)} bytes" in line
    )

    statuses = await sql(settings, "SELECT email, status FROM subscribers ORDER BY email")
    assert statuses == [
        (people[0], "bounced"), (people[1], "confirmed"), (people[2], "bounced"),
        (people[3], "confirmed"), (people[4], "bounced"),
    ]  # fmt: skip
    rows = await sql(
        settings, "SELECT kind, subscriber_id, raw_size FROM bounce_events ORDER BY id"
    )
    kinds = [r[0] for r in rows]
    assert kinds[:4] == ["hard", "unmatched", "unmatched", "hard"] and kinds[5:] == ["hard"]
    assert kinds[4] in ("ignored", "unmatched") and rows[4][1] is None  # the bomb: not acted on
    assert rows[-1][2] == len(huge)
    assert await sql(settings, "SELECT count(*) FROM suppressions") == [(0,)]


def test_the_parser_never_raises_on_mutated_reports() -> None:
    settings = Settings(env="dev", secret_key="k" * 32, verp_domain="bounce.test")
    base = postfix_dsn(original_for(settings, 1, "a@example.com"), "a@example.com", "b@x")
    rnd = random.Random(7)
    kinds = set()
    for _ in range(400):
        data = bytearray(base)
        for _ in range(rnd.randint(1, 40)):
            op = rnd.random()
            i = rnd.randrange(len(data))
            if op < 0.4:
                data[i] = rnd.randrange(256)
            elif op < 0.7:
                del data[i : i + rnd.randint(1, 200)]
            else:
                data[i:i] = rnd.choice([b"\r\n", b"--", b";", b"\xff", b"=?", b"\r\n\r\n", b":"])
        report = parse(bytes(data))
        r = report.recipients[0] if report.recipients else None
        if r is not None:
            kinds.add(
                kind_for(status=r.status, code=r.code, diagnostic=r.diagnostic, action=r.action)
            )
        assert isinstance(report.type, ReportType)
    assert len(kinds) > 1  # the mutations really reached the classifier
