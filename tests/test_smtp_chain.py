"""Chained SMTP transactions (``SmtpPool.send_chain``) against the real test server.

A chain writes each message's final dot together with the next message's MAIL + RCPT +
DATA. Whatever the relay does at any point of a chain, every message must end exactly as
it would have if sent alone, one after another on the same pool: the same typed error,
the same messages delivered byte for byte, the same connections opened. Each fault of
the pipelining tests' fault plan is run both ways, against a server that offers
PIPELINING and one that does not.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from smtpserver import STALL, SmtpServer
from test_smtp_pipeline import FAULTS, MESSAGE, SENDER, make_pool, outcome

from mailer.smtp import SendError, SmtpPool
from mailer.smtp_pipeline import wire_message

RECIPIENTS = ["first@example.com", "bad@example.com", "good@example.com", "other@example.com"]
PLAN_ATTRIBUTE = {"mail": "mail_plan", "rcpt": "rcpt_plan", "data": "data_plan", "end": "plan"}


def typed(error: Exception | None) -> tuple[Any, ...] | None:
    if error is None:
        return None
    assert isinstance(error, SendError)
    return (type(error).__name__, error.code, error.message, getattr(error, "suppress", None))


async def chained(pool: SmtpPool, recipients: list[str]) -> list[tuple[Any, ...] | None]:
    results = await pool.send_chain([(SENDER, r, MESSAGE) for r in recipients])
    assert len(results) == len(recipients)
    return [typed(error) for error, _ in results]


async def run(pipelining: bool, where: str, verdict: str, chain: bool) -> tuple[Any, ...]:
    """Send RECIPIENTS through a pool against a server with the fault planted."""
    server = SmtpServer(pipelining=pipelining).start()
    rec = server.recorder
    bad = "bad@example.com"
    plan = (lambda a, n: verdict if n == 2 else None) if where == "mail" else None
    setattr(rec, PLAN_ATTRIBUTE[where], plan or (lambda a, n: verdict if a == bad else None))
    pool = make_pool(server)
    try:
        if chain:
            results = await chained(pool, RECIPIENTS)
        else:
            results = [await outcome(pool, r) for r in RECIPIENTS]
    finally:
        await pool.close()
        server.stop()
    delivered = [(m.rcpt, m.data) for m in server.messages]
    return results, delivered, rec.connections, pool.stats.pipelined


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "unpipelined"])
@pytest.mark.parametrize(
    ("where", "verdict", "expected"), [f[1:4] for f in FAULTS], ids=[f[0] for f in FAULTS]
)
async def test_a_chain_meets_each_fault_as_messages_sent_one_by_one_do(
    pipelining: bool, where: str, verdict: str, expected: tuple[Any, ...]
) -> None:
    alone = await run(pipelining, where, verdict, chain=False)
    chain = await run(pipelining, where, verdict, chain=True)
    assert chain == alone
    results, delivered, _, _ = chain
    assert results.count(expected) == 1  # the fault hit one message, the second MAIL or bad
    assert len(delivered) == 3  # and only that one was not delivered


async def test_one_write_per_message_once_the_line_is_up() -> None:
    server = SmtpServer(pipelining=True).start()
    pool = make_pool(server)
    try:
        await pool.send(SENDER, "warm@example.com", MESSAGE)  # connect, EHLO, take over
        client = pool._idle.get_nowait()
        transport = client.transport
        assert transport is not None
        writes: list[bytes] = []
        write = transport.write

        def counting(data: Any) -> None:
            writes.append(bytes(data))
            write(data)

        transport.write = counting  # type: ignore[method-assign]
        sizes = client.supports_extension("size")
        pool._idle.put_nowait(client)
        recipients = [f"r{i}@example.com" for i in range(10)]
        assert await chained(pool, recipients) == [None] * 10
        chain_writes = writes[:]  # not the QUIT of pool.close()
    finally:
        await pool.close()
        server.stop()
    # MAIL + RCPT + DATA of the first, then each message with the next one's envelope,
    # then the last message alone: 11 writes for 10 messages, 20 unchained.
    assert len(chain_writes) == 11
    data, size = wire_message(MESSAGE)
    mail = b"MAIL FROM:<news@example.org>" + (b" SIZE=%d" % size if sizes else b"")
    assert chain_writes[0] == mail + b"\r\nRCPT TO:<r0@example.com>\r\nDATA\r\n"
    assert chain_writes[1] == data + mail + b"\r\nRCPT TO:<r1@example.com>\r\nDATA\r\n"
    assert chain_writes[10] == data
    assert [m.rcpt for m in server.messages] == ["warm@example.com", *recipients]
    assert [m.data for m in server.messages[1:]] == [MESSAGE] * 10


async def test_a_stalled_reply_mid_chain_times_out_and_the_rest_goes_on_a_new_line() -> None:
    server = SmtpServer(pipelining=True).start()
    server.recorder.rcpt_plan = lambda a, n: STALL if a == "slow@example.com" else None
    pool = make_pool(server, smtp_timeout_s=0.5)
    recipients = ["one@example.com", "slow@example.com", "two@example.com", "three@example.com"]
    try:
        results = await chained(pool, recipients)
    finally:
        await pool.close()
        server.stop()
    timeout = "connection lost: Timed out waiting for server response"
    assert results == [None, ("TransientSendError", None, timeout, None), None, None]
    assert [m.rcpt for m in server.messages] == ["one@example.com", "two@example.com",
                                                 "three@example.com"]  # fmt: skip
    assert server.recorder.connections == 2


async def test_a_chain_cancelled_mid_way_closes_its_connection() -> None:
    server = SmtpServer(pipelining=True).start()
    server.recorder.rcpt_plan = lambda a, n: STALL if a == "slow@example.com" else None
    pool = make_pool(server)
    try:
        task = asyncio.create_task(
            pool.send_chain([(SENDER, r, MESSAGE) for r in ("one@example.com", "slow@example.com")])
        )
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.wait_for(chained(pool, ["good@example.com"]), 3) == [None]
    finally:
        await pool.close()
        server.stop()
    assert [m.rcpt for m in server.messages] == ["one@example.com", "good@example.com"]
    assert server.recorder.connections == 2


async def test_an_address_that_cannot_be_pipelined_goes_alone_and_the_chain_goes_on() -> None:
    server = SmtpServer(pipelining=True).start()
    pool = make_pool(server)
    quoted = '"quoted"@example.com'
    recipients = ["one@example.com", quoted, "two@example.com", "three@example.com"]
    try:
        assert await chained(pool, recipients) == [None] * 4
    finally:
        await pool.close()
        server.stop()
    # The test server records the address unquoted.
    assert [m.rcpt for m in server.messages] == [r.replace('"', "") for r in recipients]
    assert server.recorder.connections == 1
    assert pool.stats.pipelined == 3
