"""Pipelined SMTP (RFC 2920) against the real test server, fault by fault.

Every pool-level test runs twice: against a server that offers PIPELINING (mailer writes
MAIL + RCPT + DATA at once) and one that does not (aiosmtplib's one command at a time).
Both must raise the very same typed error (class, code, message, suppress) for the same
fault, keep or drop the connection alike, and deliver the very same bytes.
"""

from __future__ import annotations

import asyncio
import random
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from helpers import blast, editor_token, publish, seed_subscribers, subscriber, wait_status
from smtpserver import DROP, STALL, SmtpServer

from mailer.config import Settings, load_settings
from mailer.smtp import SendError, SmtpPool
from mailer.smtp_pipeline import PLAIN_ADDRESS, wire_message

SENDER = "news@example.org"
MESSAGE = b"From: news@example.org\r\nSubject: hello\r\n\r\nline one\r\n.line with a dot\r\n"
MODES = ["pipelined", "one command at a time"]


@pytest.fixture(params=MODES)
def server(request: pytest.FixtureRequest) -> Iterator[SmtpServer]:
    srv = SmtpServer(pipelining=request.param == "pipelined").start()
    yield srv
    srv.stop()


def make_pool(server: SmtpServer, **overrides: Any) -> SmtpPool:
    settings = load_settings(
        env="dev",
        secret_key="pipeline-test-secret-key-0123456789abcdef",
        smtp_host="127.0.0.1",
        smtp_port=server.port,
        smtp_timeout_s=5,
    ).model_copy(update=overrides)
    return SmtpPool(settings, size=1)


async def outcome(pool: SmtpPool, recipient: str, data: bytes = MESSAGE) -> tuple[Any, ...] | None:
    try:
        await pool.send(SENDER, recipient, data)
    except SendError as exc:
        return (type(exc).__name__, exc.code, exc.message, getattr(exc, "suppress", None))
    return None


LOST = ("TransientSendError", None, "connection lost: Unexpected EOF received", None)

# (fault, where, verdict, the error mailer raises, connections after one more good send)
FAULTS = [
    ("refused RCPT", "rcpt", "550 5.1.1 <bad@example.com>: no such user",
     ("PermanentSendError", 550, "5.1.1 <bad@example.com>: no such user", True), 1),
    ("policy refusal on RCPT", "rcpt", "550 5.7.1 rejected by policy",
     ("PolicyError", 550, "5.7.1 rejected by policy", None), 1),
    ("full mailbox on RCPT", "rcpt", "552 5.2.2 mailbox full",
     ("PermanentSendError", 552, "5.2.2 mailbox full", False), 1),
    ("4xx on the DATA command", "data", "451 4.3.0 try again later",
     ("TransientSendError", 451, "4.3.0 try again later", None), 1),
    ("4xx after the message", "end", "452 4.3.1 out of storage",
     ("TransientSendError", 452, "4.3.1 out of storage", None), 1),
    ("5.3.4 after the message", "end", "552 5.3.4 message too big",
     ("PermanentSendError", 552, "5.3.4 message too big", False), 1),
    ("421 after the message", "end", "421 4.7.0 too busy, closing",
     ("TransientSendError", 421, "4.7.0 too busy, closing", None), 2),
    ("421 on MAIL", "mail", "421 4.7.0 too busy, closing",
     ("TransientSendError", 421, "4.7.0 too busy, closing", None), 2),
    ("421 on RCPT", "rcpt", "421 4.7.0 too busy, closing",
     ("TransientSendError", 421, "4.7.0 too busy, closing", None), 2),
    ("dropped line at RCPT, mid-pipeline", "rcpt", DROP, LOST, 2),
    ("dropped line at DATA", "data", DROP, LOST, 2),
    ("dropped line after the message", "end", DROP, LOST, 2),
]  # fmt: skip


@pytest.mark.parametrize(
    ("where", "verdict", "expected", "connections"),
    [f[1:] for f in FAULTS],
    ids=[f[0] for f in FAULTS],
)
async def test_each_fault_raises_the_same_typed_error_on_both_paths(
    server: SmtpServer, where: str, verdict: str, expected: tuple[Any, ...], connections: int
) -> None:
    bad, good = "bad@example.com", "good@example.com"
    rec = server.recorder
    once = {"mail": lambda a, n: verdict if n == 1 else None}
    plan = once.get(where, lambda a, n: verdict if a == bad else None)
    setattr(
        rec,
        {"mail": "mail_plan", "rcpt": "rcpt_plan", "data": "data_plan"}.get(where, "plan"),
        plan,
    )
    pool = make_pool(server)
    try:
        assert await outcome(pool, bad) == expected
        assert await outcome(pool, good) is None  # the pool recovers for the next message
        assert await outcome(pool, "other@example.com") is None
    finally:
        await pool.close()
    assert [m.rcpt for m in server.messages] == [good, "other@example.com"]
    assert rec.connections == connections  # kept after a clean refusal, reopened otherwise
    pipelined = rec.pipelining
    assert pool.stats.pipelined == (2 if pipelined else 0)


async def test_a_stalled_reply_times_out_and_the_line_is_not_reused(server: SmtpServer) -> None:
    server.recorder.rcpt_plan = lambda a, n: STALL if a == "slow@example.com" else None
    pool = make_pool(server, smtp_timeout_s=0.5)
    try:
        assert await outcome(pool, "slow@example.com") == (
            "TransientSendError", None, "connection lost: Timed out waiting for server response",
            None,
        )  # fmt: skip
        assert await outcome(pool, "good@example.com") is None
    finally:
        await pool.close()
    assert [m.rcpt for m in server.messages] == ["good@example.com"]
    assert server.recorder.connections == 2


async def test_a_send_cancelled_mid_transaction_closes_its_connection(server: SmtpServer) -> None:
    server.recorder.rcpt_plan = lambda a, n: STALL if a == "slow@example.com" else None
    pool = make_pool(server)
    try:
        task = asyncio.create_task(pool.send(SENDER, "slow@example.com", MESSAGE))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.wait_for(outcome(pool, "good@example.com"), 3) is None
    finally:
        await pool.close()
    assert [m.rcpt for m in server.messages] == ["good@example.com"]
    assert server.recorder.connections == 2


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "unpipelined"])
async def test_a_connection_the_server_closed_while_idle_is_reopened(pipelining: bool) -> None:
    server = SmtpServer(pipelining=pipelining, idle_timeout=0.3).start()
    pool = make_pool(server)
    try:
        await pool.send(SENDER, "one@example.com", MESSAGE)
        await asyncio.sleep(0.8)  # the server hangs up on the idle connection
        assert await outcome(pool, "two@example.com") is None
    finally:
        await pool.close()
        server.stop()
    assert [m.rcpt for m in server.messages] == ["one@example.com", "two@example.com"]
    assert server.recorder.connections == 2
    assert pool.stats.pipelined == (2 if pipelining else 0)


ODD_MESSAGES = [
    b"Subject: bare LF\n\nline\n.dot after LF\nend",
    b"Subject: lone CR\r\rline\r.dot after CR\r\n",
    b".leading dot on the first line\r\n\r\nbody\r\n",
    b"Subject: CR CR LF\r\r\n\r\n..two dots\r\n.\r\n",
    b"Subject: no final line end\r\n\r\nbody",
    MESSAGE,
]


async def test_the_bytes_delivered_are_the_same_on_both_paths(server: SmtpServer) -> None:
    pool = make_pool(server)
    try:
        for i, data in enumerate(ODD_MESSAGES):
            await pool.send(SENDER, f"r{i}@example.com", data)
    finally:
        await pool.close()
    got = [m.data for m in server.messages]
    assert got == [normalize_message_line_endings(d) for d in ODD_MESSAGES]
    assert pool.stats.pipelined == (len(ODD_MESSAGES) if server.recorder.pipelining else 0)


def test_wire_message_matches_aiosmtplibs_regex_passes() -> None:
    rng = random.Random(16)
    cases = [b"", b".", b"\r", b"\n", b"\r\n.", b"a\r\r\n.b", *ODD_MESSAGES]
    cases += [bytes(rng.choice(b"a.\r\n") for _ in range(rng.randrange(40))) for _ in range(3000)]
    for data in cases:
        normal = normalize_message_line_endings(data)
        assert wire_message(data) == (PERIOD_REGEX.sub(b"..", normal) + b".\r\n", len(normal))


def test_only_plain_addresses_skip_aiosmtplibs_address_parsing() -> None:
    plain = ["a@example.com", "first.last+tag@sub.example.co.uk", "o'neil@x-y.org", "r1@b"]
    for address in plain:
        assert PLAIN_ADDRESS.fullmatch(address)
        assert quote_address(address) == f"<{address}>"
    odd = ["", "a b@example.com", '"quoted"@example.com', "a@[127.0.0.1]", "ü@example.com",
           "a@example.com>", "a\r\nRCPT TO:<b@example.com", "a..b@example.com", ".a@example.com",
           "a@example.com SIZE=1", "<a@example.com>", "a@", "@example.com"]  # fmt: skip
    for address in odd:
        assert not PLAIN_ADDRESS.fullmatch(address), address


async def test_an_address_that_needs_aiosmtplib_goes_through_it_on_the_same_line(
    server: SmtpServer,
) -> None:
    pool = make_pool(server)
    try:
        await pool.send(SENDER, "one@example.com", MESSAGE)
        await pool.send(SENDER, "two@[127.0.0.1]", MESSAGE)  # a domain literal: not plain
        await pool.send(SENDER, "three@example.com", MESSAGE)
    finally:
        await pool.close()
    assert [m.rcpt for m in server.messages] == ["one@example.com", "two@[127.0.0.1]",
                                                 "three@example.com"]  # fmt: skip
    assert server.recorder.connections == 1
    assert pool.stats.pipelined == (2 if server.recorder.pipelining else 0)


@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_pipelining_over_tls(security: str, tls_ca: Any, tmp_path: Path) -> None:
    cert = tls_ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    if security == "tls":
        server = SmtpServer(tls_context=server_ctx).start()
    else:
        server = SmtpServer(starttls_context=server_ctx, require_starttls=True).start()
    tls_ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    server.recorder.rcpt_plan = lambda a, n: "550 5.1.1 no such user" if a.startswith("x") else None
    pool = make_pool(server, smtp_security=security, smtp_ca_file=tmp_path / "ca.pem")
    pool.size = 2
    pool._idle.put_nowait(pool._new_client())
    try:
        results = await asyncio.gather(
            *(outcome(pool, f"{'x' if i % 10 == 3 else 'r'}{i}@example.com") for i in range(40))
        )
    finally:
        await pool.close()
        server.stop()
    refused = ("PermanentSendError", 550, "5.1.1 no such user", True)
    assert results == [refused if i % 10 == 3 else None for i in range(40)]
    assert sorted(m.rcpt for m in server.messages) == sorted(
        f"r{i}@example.com" for i in range(40) if i % 10 != 3
    )
    # (aiosmtpd counts a STARTTLS upgrade as a second connection_made; the pool's count:)
    assert pool.stats.pipelined == 36 and pool.stats.connections_opened == 2


# The engine, end to end: faults at every stage of a pipelined transaction ---------------


def stage_fault(stage: str) -> Any:
    def plan(rcpt: str, attempt: int) -> str | None:
        n = int(re.sub(r"\D", "", rcpt))
        if stage == "rcpt" and n % 50 == 7:
            return f"550 5.1.1 <{rcpt}>: no such user"
        if stage == "rcpt" and n % 50 == 9 and attempt == 1:
            return DROP
        if stage == "data" and n % 50 == 11 and attempt <= 2:
            return "451 4.3.0 try again later"
        return None

    return plan


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "unpipelined"])
@pytest.mark.parametrize("settings_overrides", [{"batch_size": 50}])
async def test_stage_faults_on_a_blast_are_classified_and_sent_exactly_once(
    pipelining: bool,
    app_client: httpx.AsyncClient,
    smtp: SmtpServer,
    settings: Settings,
    start_worker: Any,
) -> None:
    people = await seed_subscribers(settings, confirmed=500)
    token = await editor_token(settings)
    rec = smtp.recorder
    rec.pipelining = pipelining
    rec.rcpt_plan, rec.data_plan = stage_fault("rcpt"), stage_fault("data")
    rec.mail_plan = lambda sender, n: "421 4.7.0 too busy" if n % 97 == 5 else None
    worker = await start_worker()
    bid = await blast(app_client, token, await publish(app_client, token))
    done = await wait_status(app_client, token, bid, "done", timeout=120)
    hard = [a for a in people["confirmed"] if int(re.sub(r"\D", "", a)) % 50 == 7]
    others = [a for a in people["confirmed"] if a not in hard]
    counts = rec.counts()
    assert {a: counts.get(a, 0) for a in others} == {a: 1 for a in others}  # exactly once
    assert not any(a in counts for a in hard)
    assert done["sent"] == 490 and done["failed"] == 10 and done["pending"] == 0
    for a in hard[:3]:
        sub = await subscriber(settings, a)
        assert sub is not None and sub.status == "bounced"
    verdicts = [v for _, v in rec.refused]
    assert verdicts.count(DROP) == 10 and sum(v.startswith("451") for v in verdicts) == 20
    assert sum(v.startswith("421") for v in verdicts) >= 3  # the MAIL faults happened
    assert worker.jobs_failed == 0
