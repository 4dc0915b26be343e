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
import time
from collections.abc import Sequence
from typing import Any, Literal, cast

import aiosmtplib
from aiosmtplib.typing import Default

from mailer.smtp_replies import Reply, ReplyReader
from mailer.wire import Stuffed, crlf_bytes, stuff

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


Envelope = tuple[str, str, "bytes | Stuffed"]  # sender, recipient, message
Chained = tuple[BaseException | None, float, bool]  # error, seconds, pipelined
# What send_one raises for a refusal or a lost line, each of which the pool turns into a
# SendError (SmtpPool.error_for_exception); anything else propagates, as from send_one.
CHAIN_ERRORS = (
    aiosmtplib.SMTPRecipientsRefused,
    aiosmtplib.SMTPResponseException,
    aiosmtplib.SMTPServerDisconnected,
    aiosmtplib.SMTPTimeoutError,
    OSError,
)


def line_survives(exc: BaseException) -> bool:
    """Whether the connection may carry another message after ``exc`` (one of
    CHAIN_ERRORS): a refusal leaves it usable, unless it is a 421 (the server is closing);
    a lost line, a timeout or a socket error does not."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return True
    return isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code != 421


def _message(data: bytes | Stuffed) -> tuple[bytes, int]:
    return (data.data, data.size) if isinstance(data, Stuffed) else wire_message(data)


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
        reader = await self._reader_for(sender, recipient)
        if reader is None:
            unstuffed = data.plain() if isinstance(data, Stuffed) else data
            await self.sendmail(sender, [recipient], unstuffed)
            return False
        message, size = _message(data)
        keep = False
        try:
            replies = await reader.send(self._envelope(reader, sender, recipient, size), 3)
            if len(replies) == 3 and _accepted(replies):
                ((code, text),) = await reader.send(message, 1)
                keep = code != 421
                if code != 250:
                    raise aiosmtplib.SMTPDataError(code, _text((code, text)))
                return True
            keep = True  # _refused closes the line itself when it cannot be reused
            await self._refused(reader, replies, sender, recipient)
            raise AssertionError("unreachable: _refused raises")
        finally:
            if not keep:  # a timeout, a drop, a 421, a cancelled send: never reuse the line
                self.close()

    async def send_chain(self, messages: Sequence[Envelope]) -> list[Chained]:
        """Send messages one after another, each one's final dot in the same write as the
        next one's MAIL + RCPT + DATA (RFC 2920: one write and one wake-up per message).

        One result per message attempted, in order: the exception ``send_one`` would have
        raised for the same replies (or None), the seconds from the write of its envelope
        to the reply to its message, and whether it was pipelined. Fewer results than
        messages: the line was lost before the next message got any reply, so nothing of
        it can have been delivered; the caller sends the rest on a new connection.
        Errors other than those (a cancelled send) close the line and propagate.
        """
        plain = PLAIN_ADDRESS.fullmatch
        results: list[Chained] = []
        ahead: list[Reply] | None = None  # replies to the next message's envelope, if chained
        written = 0.0  # when the next message's envelope went out
        reader: ReplyReader | None = None
        prepared: tuple[bytes, int] | None = None  # the next message's wire form, if made
        try:
            while len(results) < len(messages):
                sender, recipient, data = messages[len(results)]
                pipelined = True
                try:
                    message, size = prepared or _message(data)
                    prepared = None
                    if ahead is None or reader is None:
                        written = time.perf_counter()
                        reader = await self._reader_for(sender, recipient)
                        if reader is None:
                            pipelined = await self.send_one(sender, recipient, data)
                            results.append((None, time.perf_counter() - written, pipelined))
                            continue
                        envelope = self._envelope(reader, sender, recipient, size)
                        replies = await reader.send(envelope, 3)
                    else:
                        replies, ahead = ahead, None
                    if not (len(replies) == 3 and _accepted(replies)):
                        await self._refused(reader, replies, sender, recipient)
                    after = len(results) + 1
                    nxt = messages[after] if after < len(messages) else None
                    # This message's sender is plain (it is on the reader): most share it.
                    chained = (
                        nxt is not None
                        and (nxt[0] == sender or plain(nxt[0]) is not None)
                        and plain(nxt[1]) is not None
                    )
                    if nxt is not None and chained:
                        prepared = _message(nxt[2])
                        message += self._envelope(reader, nxt[0], nxt[1], prepared[1])
                    started, written = written, time.perf_counter()
                    got = await reader.send(message, 4 if chained else 1)
                    code, text = got[0]
                    if code == 421:  # closing: the next message goes on a new connection
                        self.close()
                    elif chained:
                        ahead = got[1:] or None  # one reply to it is enough: it was attempted
                    if code != 250:
                        raise aiosmtplib.SMTPDataError(code, _text((code, text)))
                    results.append((None, time.perf_counter() - started, True))
                except CHAIN_ERRORS as exc:
                    results.append((exc, time.perf_counter() - written, pipelined))
                    if not line_survives(exc):
                        self.close()
                if ahead is None and not self._usable():
                    break
        except BaseException:
            self.close()  # cancelled mid-chain: what the server saw is unknown
            raise
        if ahead is not None:  # the server awaits a message that will not come
            self.close()
        return results

    def _usable(self) -> bool:
        reader = self._reader
        return self.is_connected and (reader is None or reader.error is None)

    async def _reader_for(self, sender: str, recipient: str) -> ReplyReader | None:
        """The reader to pipeline a message on; None: send it through aiosmtplib."""
        plain = PLAIN_ADDRESS.fullmatch
        reader = self._reader  # set once this connection is known to pipeline
        if (
            reader is not None
            and reader.transport is self.transport
            and plain(sender)
            and plain(recipient)
        ):
            return reader
        return await self._pipeline(sender, recipient)

    @staticmethod
    def _envelope(reader: ReplyReader, sender: str, recipient: str, size: int) -> bytes:
        mail = b"MAIL FROM:<" + sender.encode() + b">"
        if reader.size:
            mail += b" SIZE=%d" % size
        return mail + b"\r\nRCPT TO:<" + recipient.encode() + b">\r\nDATA\r\n"

    async def _refused(
        self, reader: ReplyReader, replies: list[Reply], sender: str, recipient: str
    ) -> None:
        """RSET after a refused envelope (closing the line if that fails), then raise the
        refusal; if no command was refused, the line was lost: raise why."""
        try:
            keep = await self._reset(reader, replies)
        except (aiosmtplib.SMTPException, OSError):
            keep = False  # like aiosmtplib: the refusal is the answer, not the failed RSET
        if not keep:
            self.close()
        _raise_refusal(replies, sender, recipient)
        raise reader.error or aiosmtplib.SMTPServerDisconnected("Connection lost")

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
