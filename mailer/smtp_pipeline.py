"""Pipelined SMTP transactions (RFC 2920) on connections that aiosmtplib opened.

aiosmtplib does the parts where it is good and that happen once per connection:
connect, EHLO, STARTTLS or implicit TLS, AUTH. It cannot pipeline: it waits for each
reply before writing the next command, and its protocol drops replies that arrive
while it is not waiting for one. So once a connection is up and the server offers
PIPELINING, the connection's transport is handed to a small reply reader of our own
(``transport.set_protocol``, public asyncio API that plain and TLS transports of both
asyncio and uvloop implement), and one message costs two writes: MAIL + RCPT + DATA,
then the message with its final dot. Why this and not a socket of our own, and what
it saves, is in docs/smtp.md.

Every reply is turned into the exception aiosmtplib would have raised for it
(``SMTPSenderRefused``, ``SMTPRecipientsRefused``, ``SMTPDataError``,
``SMTPServerDisconnected``, ``SMTPReadTimeoutError``), so ``SmtpPool.send`` classifies a
pipelined transaction with the very same code and rules as an unpipelined one.

A connection whose state is in doubt is closed, never reused: a timeout, a dropped or
half-read line, a reply that is malformed or that nobody asked for, a 354 after a
refused envelope, a failed RSET, a cancelled send, and any 421 (the server is closing).
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, cast

import aiosmtplib
from aiosmtplib.errors import SMTPReadTimeoutError
from aiosmtplib.typing import Default

from mailer.wire import Stuffed, crlf_bytes, stuff

Reply = tuple[int, bytes]  # code, text lines (without the code) joined by b"\n"

# A reply longer than this without its last line is not SMTP (aiosmtplib's own bound).
MAX_REPLY = 8192 * 4

# Addresses that need no quoting, parsing or SMTPUTF8: a dot-atom local part and a dot-atom
# domain (RFC 5321 4.1.2). For these, aiosmtplib's quote_address gives "<address>"
# unchanged; anything else (quoted local parts, domain literals, non-ASCII, spaces,
# brackets, control characters) goes through aiosmtplib's sendmail, which validates it.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
PLAIN_ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


def wire_message(data: bytes) -> tuple[bytes, int]:
    """The message as it follows DATA, and its SIZE (RFC 1870: CRLF line ends, unstuffed).

    Line ends become CRLF and a leading dot is doubled (RFC 5321 4.5.2), each only if the
    message needs it. Same result as aiosmtplib's two regex passes. A blast's messages
    skip this: render.py builds them in this form (``wire.Stuffed``); this is the path
    for every other message (test sends, confirmations, notices, DKIM-signed ones).
    """
    data = crlf_bytes(data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return stuff(data, line_start=True) + b".\r\n", len(data)


class ReplyReader(asyncio.Protocol):
    """Splits the server's byte stream into replies and hands them out in command order.

    ``send(data, n)`` writes ``data`` and returns a future for the next ``n`` replies;
    futures complete in the order they were asked for, so commands of several writes can
    be in flight at once. One wake-up per batch of replies, not per reply. If the line
    fails after some of a batch's replies arrived, the future gets those (fewer than
    ``n``) and ``error`` says why the rest are missing.

    A single timer watches progress: if replies are awaited and none has arrived for
    ``timeout`` seconds, everything pending fails with a timeout and the line is cut.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        timeout: float | None,
        on_lost: Callable[[ReplyReader], None],
    ) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._on_lost = on_lost
        self._tail = b""  # an incomplete line
        self._lines: list[bytes] = []  # the lines so far of a multi-line reply
        self._waiting: deque[tuple[int, list[Reply], asyncio.Future[list[Reply]]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._progress = 0.0
        self.error: BaseException | None = None
        self.size = False  # the server takes MAIL FROM's SIZE= (RFC 1870)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._tail and not self._lines

    def send(self, data: bytes, replies: int) -> asyncio.Future[list[Reply]]:
        if self.error is not None:
            raise self.error
        self.transport.write(data)  # first: if it raises, nothing waits (replies come later)
        future: asyncio.Future[list[Reply]] = self._loop.create_future()
        if not self._waiting:
            self._progress = self._loop.time()
            if self._timer is None and self._timeout is not None:
                self._timer = self._loop.call_at(self._progress + self._timeout, self._watch)
        self._waiting.append((replies, [], future))
        return future

    def _watch(self) -> None:
        self._timer = None
        if not self._waiting or self._timeout is None:
            return
        due = self._progress + self._timeout
        if self._loop.time() >= due:
            self.fail(SMTPReadTimeoutError("Timed out waiting for server response"))
        else:
            self._timer = self._loop.call_at(due, self._watch)

    def fail(self, exc: BaseException) -> None:
        """Fail everything pending and cut the line: its state is unknown from here on."""
        if self.error is None:
            self.error = exc
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, deque()
        for _, got, future in waiting:
            if future.done():
                continue
            if got:  # the replies that did arrive: a refusal among them is the real answer
                future.set_result(got)
            else:
                future.set_exception(exc)
        if not self.transport.is_closing():
            self.transport.abort()
        self._on_lost(self)

    # asyncio.Protocol ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._tail:
            data = self._tail + data
            self._tail = b""
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            line = data[start:end]
            start = end + 1
            code = line[:3]
            mark = line[3:4]
            if not code.isdigit() or mark not in (b" ", b"-", b"\r", b""):
                text = line.decode("utf-8", "ignore")
                self.fail(
                    aiosmtplib.SMTPResponseException(-1, f"Malformed SMTP response line: {text}")
                )
                return
            self._lines.append(line[4:].strip(b" \t\r\n"))
            if mark == b"-":
                continue
            lines, self._lines = self._lines, []
            if not self._waiting:
                self.fail(aiosmtplib.SMTPServerDisconnected("Unexpected reply from the server"))
                return
            count, got, future = self._waiting[0]
            got.append((int(code), lines[0] if len(lines) == 1 else b"\n".join(lines)))
            if len(got) == count:
                self._waiting.popleft()
                if not future.done():
                    future.set_result(got)
        if start < len(data):
            self._tail = data[start:]
        if len(self._tail) + sum(map(len, self._lines)) > MAX_REPLY:
            self.fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
            return
        self._progress = self._loop.time()

    def eof_received(self) -> bool:
        self.fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self.fail(lost)


def _text(reply: Reply) -> str:
    return reply[1].decode("utf-8", "surrogateescape")


class PipeliningSMTP(aiosmtplib.SMTP):
    """aiosmtplib's client, plus ``send_one``: one message to one recipient, pipelined
    when the server offers PIPELINING and both addresses are plain, else ``sendmail``."""

    def __init__(self, *, pipelining: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.use_pipelining = pipelining
        self._reader: ReplyReader | None = None

    def close(self) -> None:
        reader, self._reader = self._reader, None
        super().close()
        if reader is not None and reader.error is None:
            reader.fail(aiosmtplib.SMTPServerDisconnected("Connection closed"))

    async def quit(
        self, *, timeout: float | Literal[Default.token] | None = Default.token
    ) -> aiosmtplib.SMTPResponse:
        if not self._hand_back():
            self.close()
            raise aiosmtplib.SMTPServerDisconnected("Connection closed")
        return await super().quit(timeout=timeout)

    def _lost(self, reader: ReplyReader) -> None:
        if reader is self._reader:
            self.close()

    def _take_over(self) -> ReplyReader:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport | None, self.transport)
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        reader = ReplyReader(transport, self.timeout, self._lost)
        reader.size = self.supports_extension("size")
        transport.set_protocol(reader)
        self._reader = reader
        return reader

    def _hand_back(self) -> bool:
        """Give the transport back to aiosmtplib's protocol (for QUIT or a sendmail)."""
        reader = self._reader
        if reader is None:
            return True
        if not reader.idle or reader.error is not None or self.protocol is None:
            return False
        reader.transport.set_protocol(self.protocol)
        self._reader = None
        return True

    async def send_one(self, sender: str, recipient: str, data: bytes | Stuffed) -> bool:
        """Send one message; raise what aiosmtplib's ``sendmail`` would raise for the same
        replies. True when the transaction was pipelined. A ``Stuffed`` message goes out
        as it is (aiosmtplib, which stuffs on its own, gets it back in plain form)."""
        plain = PLAIN_ADDRESS.fullmatch
        reader = self._reader  # set once this connection is known to pipeline
        if (
            reader is None
            or reader.transport is not self.transport
            or not (plain(sender) and plain(recipient))
        ):
            reader = await self._pipeline(sender, recipient)
            if reader is None:
                unstuffed = data.plain() if isinstance(data, Stuffed) else data
                await self.sendmail(sender, [recipient], unstuffed)
                return False
        message, size = (data.data, data.size) if isinstance(data, Stuffed) else wire_message(data)
        mail = b"MAIL FROM:<" + sender.encode() + b">"
        if reader.size:
            mail += b" SIZE=%d" % size
        envelope = mail + b"\r\nRCPT TO:<" + recipient.encode() + b">\r\nDATA\r\n"
        keep = False
        try:
            replies = await reader.send(envelope, 3)
            if len(replies) == 3 and _accepted(replies):
                ((code, text),) = await reader.send(message, 1)
                keep = code != 421
                if code != 250:
                    raise aiosmtplib.SMTPDataError(code, _text((code, text)))
                return True
            try:
                keep = await self._reset(reader, replies)
            except (aiosmtplib.SMTPException, OSError):
                keep = False  # like aiosmtplib: the refusal is the answer, not the failed RSET
            _raise_refusal(replies, sender, recipient)
            raise reader.error or aiosmtplib.SMTPServerDisconnected("Connection lost")
        finally:
            if not keep:  # a timeout, a drop, a 421, a cancelled send: never reuse the line
                self.close()

    async def _pipeline(self, sender: str, recipient: str) -> ReplyReader | None:
        """The reader to pipeline this message on, or None to send it through aiosmtplib
        (the server offers no PIPELINING, or an address needs aiosmtplib's parsing)."""
        await self.greet()
        plain = PLAIN_ADDRESS.fullmatch
        if (
            self.use_pipelining
            and self.supports_extension("pipelining")
            and plain(sender)
            and plain(recipient)
        ):
            reader = self._reader
            if reader is None or reader.transport is not self.transport:
                reader = self._take_over()
            return reader
        if not self._hand_back():
            self.close()
            raise aiosmtplib.SMTPServerDisconnected("Connection closed")
        return None

    async def greet(self) -> None:
        """EHLO (HELO if refused) unless done: connect() greets only for STARTTLS or AUTH."""
        if self.is_ehlo_or_helo_needed:
            try:
                await self.ehlo()
            except aiosmtplib.SMTPHeloError:
                if not self.is_connected:
                    raise
                await self.helo()  # what sendmail does with a server that refuses EHLO

    async def _reset(self, reader: ReplyReader, replies: list[Reply]) -> bool:
        """RSET after a refused envelope, as aiosmtplib does. False: close the line instead
        (it is closing, the server took DATA for a refused envelope, or RSET failed)."""
        if len(replies) < 3 or replies[2][0] == 354 or any(c == 421 for c, _ in replies):
            return False
        ((code, _),) = await reader.send(b"RSET\r\n", 1)
        return code == 250


def _accepted(replies: list[Reply]) -> bool:
    return replies[0][0] == 250 and replies[1][0] in (250, 251) and replies[2][0] == 354


def _raise_refusal(replies: list[Reply], sender: str, recipient: str) -> None:
    """The error for the first refused command, the one aiosmtplib would have stopped at."""
    mail = replies[0]
    if mail[0] != 250:
        raise aiosmtplib.SMTPSenderRefused(mail[0], _text(mail), sender)
    if len(replies) > 1 and replies[1][0] not in (250, 251):
        refused = aiosmtplib.SMTPRecipientRefused(replies[1][0], _text(replies[1]), recipient)
        raise aiosmtplib.SMTPRecipientsRefused([refused])
    if len(replies) > 2 and replies[2][0] != 354:
        raise aiosmtplib.SMTPDataError(replies[2][0], _text(replies[2]))
