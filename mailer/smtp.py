"""SMTP: a pool of persistent connections and the meaning of every reply.

aiosmtplib runs one transaction at a time per connection, so parallel sending
needs several connections, not several tasks on one. A client closes itself on
a drop, a timeout or a 421; the pool notices (``is_connected``) and reconnects
on the next use instead of failing the next message too. When the relay offers
PIPELINING, a transaction is two writes instead of four round trips
(mailer/smtp_pipeline.py, docs/smtp.md); every reply is classified here either way.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum

import aiosmtplib

from mailer.config import Settings, SmtpSecurity
from mailer.dkim import DkimSigner
from mailer.errors import MailerError
from mailer.smtp_pipeline import CHAIN_ERRORS, Envelope, PipeliningSMTP, line_survives
from mailer.wire import Stuffed

# What SmtpPool.held lends a sender: one relay connection.
Connection = PipeliningSMTP

# Errors ---------------------------------------------------------------------


class SendError(MailerError):
    """A message that was not accepted; carries the SMTP code (None: no reply at all)."""

    def __init__(self, code: int | None, message: str, recipient: str | None = None) -> None:
        super().__init__(f"{code} {message}" if code else message)
        self.code = code
        self.message = message
        self.recipient = recipient


class TransientSendError(SendError):
    """Try again later: 4xx replies, timeouts, dropped connections."""


class PermanentSendError(SendError):
    """Never retry. ``suppress`` says whether the address itself is dead (a hard bounce)."""

    def __init__(
        self, code: int | None, message: str, recipient: str | None = None, *, suppress: bool
    ) -> None:
        super().__init__(code, message, recipient)
        self.suppress = suppress


class PolicyError(SendError):
    """The receiver refuses *us* (5.7.x, 554): pause and alert, don't blame the recipient."""


class SmtpConfigError(MailerError):
    """The relay cannot be used at all (TLS verification, authentication): not a retry."""


# Reply classification --------------------------------------------------------


class Verdict(StrEnum):
    retry = "retry"
    bounce = "bounce"  # permanent, suppress the address
    reject = "reject"  # permanent, keep the address (message problem)
    policy = "policy"  # permanent for this message, sender's problem


_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")

# (reply code prefix or None, enhanced status prefix or None, verdict); first match wins.
# RFC 5321 / RFC 3463; see docs/design.md#smtp-reply-classes.
RULES: list[tuple[str | None, str | None, Verdict]] = [
    ("4", None, Verdict.retry),
    ("552", "5.5.3", Verdict.retry),  # "too many recipients" is really a 452
    (None, "5.7.", Verdict.policy),
    (None, "5.3.4", Verdict.reject),  # message too big: fix the message
    (None, "5.2.2", Verdict.reject),  # mailbox full: not the address's fault forever
    (None, "5.1.", Verdict.bounce),  # bad mailbox / domain / null MX (5.1.10)
    (None, "5.2.1", Verdict.bounce),  # mailbox disabled
    (None, "5.4.4", Verdict.bounce),  # unable to route
    ("554", None, Verdict.policy),
    ("550", None, Verdict.bounce),
    ("551", None, Verdict.bounce),
    ("553", None, Verdict.bounce),
    ("5", None, Verdict.reject),
]


def classify(code: int | None, message: str) -> Verdict:
    if code is None:
        return Verdict.retry
    match = _ENHANCED.search(message)
    enhanced = ".".join(match.groups()) if match else ""
    for code_prefix, status_prefix, verdict in RULES:
        if code_prefix is not None and not str(code).startswith(code_prefix):
            continue
        if status_prefix is not None and not enhanced.startswith(status_prefix):
            continue
        return verdict
    return Verdict.retry  # 2xx/3xx where a final reply was expected: treat as a glitch


def error_for(code: int | None, message: str, recipient: str | None = None) -> SendError:
    verdict = classify(code, message)
    if verdict is Verdict.retry:
        return TransientSendError(code, message, recipient)
    if verdict is Verdict.policy:
        return PolicyError(code, message, recipient)
    return PermanentSendError(code, message, recipient, suppress=verdict is Verdict.bounce)


# The pool --------------------------------------------------------------------

# What became of one message of a chain (None: accepted), and the seconds it took.
Result = tuple[SendError | SmtpConfigError | None, float]


@dataclass
class PoolStats:
    connections_opened: int = 0
    transactions: int = 0
    pipelined: int = 0


class SmtpPool:
    """Every message leaves through here, so this is also where DKIM signing happens."""

    def __init__(self, settings: Settings, size: int | None = None) -> None:
        self._settings = settings
        self.size = size or settings.smtp_connections
        self._dkim = DkimSigner.from_settings(settings)
        self._idle: asyncio.LifoQueue[PipeliningSMTP] = asyncio.LifoQueue()
        for _ in range(self.size):
            self._idle.put_nowait(self._new_client())
        self.stats = PoolStats()

    def _tls_context(self) -> ssl.SSLContext:
        ca = self._settings.smtp_ca_file
        return ssl.create_default_context(cafile=str(ca) if ca else None)

    def _new_client(self) -> PipeliningSMTP:
        s = self._settings
        security = s.smtp_security
        return PipeliningSMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            timeout=s.smtp_timeout_s,
            use_tls=security == SmtpSecurity.tls,
            start_tls=security == SmtpSecurity.starttls,
            tls_context=self._tls_context() if security != SmtpSecurity.none else None,
            username=s.smtp_username,
            password=s.smtp_password.get_secret_value() if s.smtp_password else None,
        )

    async def _ensure_connected(self, client: aiosmtplib.SMTP) -> None:
        if client.is_connected:
            return
        try:
            await client.connect()
        except ssl.SSLError as exc:
            raise SmtpConfigError(f"TLS to {self._settings.smtp_host} failed: {exc}") from exc
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise SmtpConfigError(f"SMTP authentication failed: {exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            if isinstance(exc.__cause__, ssl.SSLError):
                raise SmtpConfigError(f"TLS to {self._settings.smtp_host} failed: {exc}") from exc
            raise TransientSendError(None, f"cannot connect to SMTP relay: {exc}") from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise error_for(exc.code, exc.message) from exc
        self.stats.connections_opened += 1

    async def warm(self) -> None:
        """Open and greet every idle connection that is closed, all at once.

        A rate-limited send calls this before it books its first slot: a connection set up
        inside a slot reaches the relay late, and its message then lands in the same
        one-second window as the slots booked after it (docs/smtp.md). Failures are left
        for the send itself to meet and classify.
        """
        clients = [self._idle.get_nowait() for _ in range(self._idle.qsize())]
        try:
            await asyncio.gather(
                *(self._open(c) for c in clients if not c.is_connected), return_exceptions=True
            )
        finally:
            for client in clients:
                self._idle.put_nowait(client)

    async def _open(self, client: PipeliningSMTP) -> None:
        await self._ensure_connected(client)
        await client.greet()

    @asynccontextmanager
    async def held(self) -> AsyncIterator[Connection]:
        """One connection, kept from before a send's slot is booked until its write.

        A rate-limited send takes its connection first: waiting for one after its slot
        (all busy, their relay slow to answer) would let sends whose slots have passed
        leave together, and overfill a one-second window (docs/smtp.md).
        """
        client = await self._idle.get()
        try:
            yield client
        finally:
            self._idle.put_nowait(client)

    async def send(
        self,
        sender: str,
        recipient: str,
        data: bytes | Stuffed,
        client: Connection | None = None,
    ) -> None:
        """Send one message to one recipient; raise a typed SendError unless accepted.

        ``client`` is a connection from ``held``; without one, the next idle one is used.
        A blast message comes ready for DATA (``Stuffed``), unless DKIM signs it
        (``_signed``)."""
        data = self._signed(data)
        if client is not None:
            return await self._send_on(client, sender, recipient, data)
        idle = await self._idle.get()  # per message on unlimited blasts: no context manager
        try:
            await self._send_on(idle, sender, recipient, data)
        finally:
            self._idle.put_nowait(idle)

    async def send_chain(self, messages: Sequence[Envelope]) -> list[Result]:
        """Send messages on one connection, each chained to the next (RFC 2920, docs/smtp.md).

        One result per message, in order: None when accepted, else the typed SendError
        ``send`` would have raised for the same replies; and the seconds it took. A chain
        that loses its line goes on over a new one. Only an SmtpConfigError (the relay is
        unusable) ends it early: it is the last result, and the rest were not attempted.
        """
        if self._dkim is not None:
            messages = [(s, r, self._signed(d)) for s, r, d in messages]
        results: list[Result] = []
        client = await self._idle.get()
        try:
            while len(results) < len(messages):
                try:
                    await self._ensure_connected(client)
                except (SendError, SmtpConfigError) as exc:  # the next message's answer
                    results.append((exc, 0.0))
                    if isinstance(exc, SmtpConfigError):
                        break
                    continue
                rest = messages[len(results) :]
                for (_, recipient, _), (error, seconds, pipelined) in zip(
                    rest, await client.send_chain(rest), strict=False
                ):
                    self.stats.transactions += 1
                    if error is None:
                        self.stats.pipelined += pipelined
                        results.append((None, seconds))
                    else:
                        typed = self.error_for_exception(client, error, recipient)
                        results.append((typed, seconds))
        except asyncio.CancelledError:
            client.close()  # cancelled mid-chain: what the server saw is unknown
            raise
        finally:
            self._idle.put_nowait(client)
        return results

    def _signed(self, data: bytes | Stuffed) -> bytes | Stuffed:
        """The message DKIM-signed, if signing is on. DKIM signs the message itself, so a
        signed one goes on as plain bytes (signing costs milliseconds, the stuffing is
        nothing next to it)."""
        if self._dkim is None:
            return data
        return self._dkim.sign(data.plain() if isinstance(data, Stuffed) else data)

    async def _send_on(
        self, client: Connection, sender: str, recipient: str, data: bytes | Stuffed
    ) -> None:
        try:
            await self._ensure_connected(client)
            self.stats.transactions += 1
            if await client.send_one(sender, recipient, data):  # pipelined if offered
                self.stats.pipelined += 1
        except CHAIN_ERRORS as exc:
            raise self.error_for_exception(client, exc, recipient) from exc
        except asyncio.CancelledError:
            client.close()  # cancelled mid-transaction: what the server saw is unknown
            raise

    @staticmethod
    def error_for_exception(client: Connection, exc: BaseException, recipient: str) -> SendError:
        """The typed error for what aiosmtplib (or the pipeline) raised; a line whose state
        is in doubt is closed (smtp_pipeline.line_survives)."""
        if not line_survives(exc):
            client.close()
        if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
            refused = exc.recipients[0]
            return error_for(refused.code, refused.message, recipient)
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            return error_for(exc.code, exc.message, recipient)
        return TransientSendError(None, f"connection lost: {exc}", recipient)  # line lost

    async def close(self) -> None:
        clients = []
        while not self._idle.empty():
            clients.append(self._idle.get_nowait())
        for client in clients:
            if client.is_connected:
                try:
                    await asyncio.wait_for(client.quit(), 2)
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()
            self._idle.put_nowait(client)
