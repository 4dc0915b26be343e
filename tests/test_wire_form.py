"""A blast message built ready for DATA is, byte for byte, what was sent before.

``CompiledMessage.wire`` converts line ends and stuffs dots once per blast and only
splices the recipient's values per message (docs/smtp.md). Before it, every message was
built by ``CompiledMessage.build`` and converted whole by ``smtp_pipeline.wire_message``
on its way out; the tests here hold the new form to exactly those bytes: on a raw
socket (the whole SMTP transaction, SIZE included), through a server that decodes DATA,
and over many generated statements and URLs.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smtpserver import SmtpServer

from mailer.config import Settings, load_settings
from mailer.render import CompiledMessage, Renderer, StatementContent, make_message_id
from mailer.smtp import SmtpPool
from mailer.smtp_pipeline import wire_message
from mailer.tokens import Tokens
from mailer.wire import URL, Stuffed, line_value, qp

SENDER = "news@example.org"
DATE = "Thu, 03 Dec 2026 14:00:00 +0000"
BODY = "First line.\n.A line that starts with a dot\n..and one with two\n.\nThe end."


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "dev",
        "secret_key": "wire-form-test-secret-key-0123456789abcdef",
        "from_address": "updates@example.org",
        "smtp_host": "127.0.0.1",
        "smtp_timeout_s": 5,
    }
    values.update(overrides)
    return load_settings(**values)


def compiled(body: str = BODY, **overrides: Any) -> tuple[Settings, CompiledMessage]:
    s = make_settings(**overrides)
    html = "".join(f"<p>{line}</p>\n" for line in body.split("\n"))
    content = StatementContent("A statement", html, body, "Ann Example", None)
    return s, Renderer(s).compile_statement(content, blast_id=7)


def dotted_url(s: Settings, subscriber_id: int) -> str:
    """The subscriber's real unsubscribe URL, under a base URL whose length puts a dot of
    the token at the start of a quoted-printable continuation line."""
    token = Tokens(s.signing_keys, s.confirm_token_ttl_s).unsubscribe(subscriber_id)
    for pad in range(200):
        url = f"https://news.example.org/{'p' * pad}/unsubscribe/{token}"
        if b"\n." in qp(url.encode()):
            return url
    raise AssertionError("no padding puts a dot at a line start")


def values(s: Settings, subscriber_id: int = 42) -> dict[str, str]:
    return {
        "to": f"reader{subscriber_id}@example.com",
        "unsubscribe_url": dotted_url(s, subscriber_id),
        "message_id": make_message_id(s, 7, subscriber_id),
        "date": DATE,
    }


def test_a_blast_message_is_the_bytes_wire_message_made_of_it() -> None:
    s, message = compiled()
    args = values(s)
    built = message.build(**args)
    assert b"\r\n.A line that starts with a dot" in built  # the cases this is about
    assert args["unsubscribe_url"].encode() in built
    wire = message.wire(**args)
    assert (wire.data, wire.size) == wire_message(built)
    # (b2a_qp writes a line of a lone dot as =2E, so that one needs no stuffing)
    assert b"\r\n..A line that starts with a dot\r\n...and one with two\r\n=2E\r\n" in wire.data
    assert wire.plain() == built


def test_every_personalised_dot_is_stuffed() -> None:
    """The URL's quoted-printable continuation line starts with a dot in both parts."""
    s, message = compiled()
    args = values(s)
    wire = message.wire(**args)
    encoded = qp(args["unsubscribe_url"].encode())
    stuffed = encoded.replace(b"\n.", b"\n..")
    assert stuffed != encoded
    assert wire.data.count(stuffed) == message.build(**args).count(encoded) >= 2
    lines = wire.data[:-3].split(b"\r\n")
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines)


def test_values_that_could_break_a_line_are_refused() -> None:
    _, message = compiled()
    args = {"to": "r@example.com", "unsubscribe_url": "https://x.org/u", "message_id": "<a@b>"}
    for field, bad in [
        ("to", "r@example.com\r\n.\r\nMAIL FROM:<x@y>"),
        ("to", "r@example.com\n."),
        ("unsubscribe_url", "https://x.org/u\r\n.\r\n"),
        ("message_id", "<a@b>\r\n.X: y"),
    ]:
        with pytest.raises(ValueError, match="invalid"):
            message.wire(**(args | {field: bad}))
    with pytest.raises(ValueError, match="start a line with a dot"):
        line_value(b".x")
    with pytest.raises(ValueError, match="end one"):
        line_value(b"x=\r\n")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.text(alphabet="a.\r\n =é<", max_size=300),
    path=st.from_regex(r"[A-Za-z0-9.=&%/~_-]{0,200}", fullmatch=True),
    title=st.text(alphabet="a.\r\n", min_size=1, max_size=40),
)
def test_any_statement_and_url_give_the_bytes_of_before(body: str, path: str, title: str) -> None:
    s = make_settings()
    html = "".join(f"<p>{line}</p>\n." for line in body.split("\n"))
    content = StatementContent(title, html, body, None, None)
    message = Renderer(s).compile_statement(content, blast_id=1)
    url = f"https://n.example.org/{path}"
    assert URL.fullmatch(url)
    args = {"to": "a.b@example.com", "unsubscribe_url": url, "message_id": "<x.y@z>", "date": DATE}
    wire = message.wire(**args)
    built = message.build(**args)
    assert (wire.data, wire.size) == wire_message(built)
    assert wire.plain() == built


class RawServer:
    """An SMTP server that offers PIPELINING and SIZE and keeps every byte sent to it
    after EHLO, to compare whole transactions as they crossed the socket."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw ready\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250-raw\r\n250-PIPELINING\r\n250 SIZE 10000000\r\n")
                continue
            self.received += line
            if verb == b"DATA":
                writer.write(b"354 go on\r\n")
                message = await reader.readuntil(b"\r\n.\r\n")
                self.received += message
                writer.write(b"250 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 ok\r\n")
        writer.close()


async def transaction(data: bytes | Stuffed) -> bytes:
    server = await RawServer().start()
    pool = SmtpPool(make_settings(smtp_port=server.port), size=1)
    try:
        await pool.send(SENDER, "reader42@example.com", data)
        assert pool.stats.pipelined == 1
    finally:
        await pool.close()
        await server.stop()
    return bytes(server.received)


async def test_the_transaction_on_the_socket_is_byte_identical() -> None:
    """MAIL FROM with its SIZE, RCPT, DATA, the message and its dot: the same bytes from
    the message built for DATA as from the one converted on the way out."""
    s, message = compiled()
    args = values(s)
    before = await transaction(message.build(**args))
    after = await transaction(message.wire(**args))
    assert before == after
    assert b" SIZE=%d\r\n" % len(message.build(**args)) in after
    assert b"\r\n..A line that starts with a dot\r\n" in after


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one at a time"])
async def test_a_server_receives_the_message_as_built(pipelining: bool) -> None:
    """Without PIPELINING aiosmtplib sends the message, from its plain form."""
    server = SmtpServer(pipelining=pipelining).start()
    s, message = compiled(smtp_port=server.port)
    pool = SmtpPool(s, size=1)
    try:
        await pool.send(SENDER, "reader42@example.com", message.wire(**values(s)))
        got = server.wait_for(1)
    finally:
        await pool.close()
        server.stop()
    assert [m.data for m in got] == [message.build(**values(s))]
    assert pool.stats.pipelined == (1 if pipelining else 0)
