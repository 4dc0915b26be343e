"""A real SMTP server for tests: aiosmtpd in the test process, recording every message.

It can answer any reply (421/451/550 …) or drop the connection on cue, counts
connections, and speaks STARTTLS or implicit TLS with a given certificate. It
advertises PIPELINING (RFC 2920; aiosmtpd reads pipelined commands in order but does
not say so by itself) unless told not to, so both of mailer's SMTP paths can be tested.

Faults: ``plan`` answers at the end of the message (after the final dot), as before;
``mail_plan``, ``rcpt_plan`` and ``data_plan`` answer the MAIL, RCPT and DATA commands
themselves; ``hold`` delays the acceptance of chosen messages (a slow relay). A stage
plan may also return STALL (answer nothing for a long while), and
a 421 from a stage plan closes the connection after the reply, as RFC 5321 says a
server does.

Each message is stamped with the kernel's receive time (``SO_TIMESTAMPNS``) of its MAIL
command (``started``) and of its last bytes (``at``), not with the time the server thread
got round to it: rate tests measure the sender on the wire, and a busy test process must
not bunch their timestamps up.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

DROP = "drop"
STALL = "stall"  # stage plans only: no reply for STALL_S seconds
STALL_S = 30.0
# A fault plan sees (recipient, attempt number for that recipient) and returns None to accept,
# an SMTP reply line such as "451 4.3.0 try later" to refuse, or DROP to cut the line.
FaultPlan = Callable[[str, int], str | None]


@dataclass
class Received:
    mail_from: str
    rcpt: str
    data: bytes
    at: float  # when the end of the message reached the server's socket (kernel time)
    session: int
    # When its MAIL command reached the socket: the moment the sender began the
    # transaction, before any reply of this server. Rate tests use this one: the end of
    # the message waits for this server's 354, so a stalled test process would bunch `at`.
    started: float = 0.0

    @property
    def message(self) -> EmailMessage:
        msg = message_from_bytes(self.data, policy=policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass
class Recorder:
    messages: list[Received] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    refused: list[tuple[str, str]] = field(default_factory=list)
    connections: int = 0
    plan: FaultPlan | None = None
    # Stage plans: MAIL sees (sender, how-many-th MAIL command this is, counting all);
    # RCPT and DATA see (recipient, its attempt at that stage).
    mail_plan: FaultPlan | None = None
    rcpt_plan: FaultPlan | None = None
    data_plan: FaultPlan | None = None
    stage_attempts: dict[tuple[str, str], int] = field(default_factory=dict)
    mails: int = 0
    # Seconds to wait before accepting the n-th message (1-based, counting all): a relay
    # slow to answer, holding the sender's connection meanwhile.
    hold: Callable[[int], float] | None = None
    pipelining: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def to(self, rcpt: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.rcpt == rcpt]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with self.lock:
            for m in self.messages:
                out[m.rcpt] = out.get(m.rcpt, 0) + 1
        return out

    def clear(self) -> None:
        with self.lock:
            self.messages.clear()
            self.attempts.clear()
            self.refused.clear()
            self.stage_attempts.clear()
            self.mails = 0
            self.connections = 0

    def stage_fault(self, stage: str, plan: FaultPlan | None, key: str) -> str | None:
        """The plan's verdict for this stage, counting attempts; refusals are recorded."""
        if plan is None:
            return None
        with self.lock:
            attempt = self.stage_attempts.get((stage, key), 0) + 1
            self.stage_attempts[(stage, key)] = attempt
        verdict = plan(key, attempt)
        if verdict is not None:
            with self.lock:
                self.refused.append((key, verdict))
        return verdict


async def _stage_reply(server: SMTP, verdict: str) -> str:
    """Carry out a stage plan's verdict; the returned line is what aiosmtpd answers."""
    if verdict == STALL:
        await asyncio.sleep(STALL_S)
        return "451 4.4.2 stalled"
    transport = server.transport
    if verdict == DROP:
        if transport is not None:
            transport.abort()
        return "421 4.4.2 connection dropped"
    if verdict.startswith("421") and transport is not None:
        asyncio.get_running_loop().call_soon(transport.close)  # after the reply is written
    return verdict


class _Handler:
    def __init__(self, recorder: Recorder) -> None:
        self.rec = recorder

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.rec.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        rec = self.rec
        if isinstance(server, _CountingSMTP):
            server.mail_at = _received_at(server)
        with rec.lock:
            rec.mails += 1
            n = rec.mails
        verdict = rec.mail_plan(address, n) if rec.mail_plan else None
        if verdict is not None:
            with rec.lock:
                rec.refused.append((address, verdict))
            return await _stage_reply(server, verdict)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        verdict = self.rec.stage_fault("RCPT", self.rec.rcpt_plan, address)
        if verdict is not None:
            return await _stage_reply(server, verdict)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        rec = self.rec
        rcpts = list(envelope.rcpt_tos)
        replies = []
        for rcpt in rcpts:
            with rec.lock:
                attempt = rec.attempts.get(rcpt, 0) + 1
                rec.attempts[rcpt] = attempt
            verdict = rec.plan(rcpt, attempt) if rec.plan else None
            replies.append(verdict)
        for rcpt, verdict in zip(rcpts, replies, strict=True):
            if verdict == DROP:
                with rec.lock:
                    rec.refused.append((rcpt, DROP))
                if server.transport is not None:
                    server.transport.abort()
                return "421 4.4.2 connection dropped"
            if verdict is not None:
                with rec.lock:
                    rec.refused.append((rcpt, verdict))
                return verdict
        data = envelope.original_content or b""
        at = _received_at(server)
        started = getattr(server, "mail_at", 0.0) or at
        with rec.lock:
            for rcpt in rcpts:
                rec.messages.append(
                    Received(str(envelope.mail_from), rcpt, data, at, id(session), started)
                )
            n = len(rec.messages)
        if rec.hold is not None and (delay := rec.hold(n)) > 0:
            await asyncio.sleep(delay)
        return "250 2.0.0 OK queued"


# Linux's SO_TIMESTAMPNS (the "old" 64-bit timespec form): with it set, every recvmsg()
# carries the kernel's receive time of the data it returns.
SO_TIMESTAMPNS = 35
_ANCILLARY = socket.CMSG_SPACE(16)


class _StampedSocket(socket.socket):
    """A connection that remembers when the bytes it last returned reached the kernel.

    asyncio reads a connection with ``recv`` (or ``recv_into`` under TLS); both go through
    ``recvmsg`` here to pick up the timestamp. SMTP without PIPELINING is lock-step, so when
    a message's DATA is complete, the last bytes read are its final line.
    """

    received_at = 0.0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data, ancillary, _, _ = self.recvmsg(bufsize, _ANCILLARY, flags)
        self._note(ancillary)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer)
        n, ancillary, _, _ = self.recvmsg_into(
            [view[:nbytes] if nbytes else view], _ANCILLARY, flags
        )
        self._note(ancillary)
        return n

    def _note(self, ancillary: list[tuple[int, int, bytes]]) -> None:
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                seconds, nanoseconds = struct.unpack("qq", data[:16])
                self.received_at = seconds + nanoseconds / 1e9


class _StampingListener(socket.socket):
    def accept(self) -> tuple[socket.socket, Any]:
        fd, address = self._accept()  # type: ignore[attr-defined]
        conn = _StampedSocket(self.family, self.type, self.proto, fileno=fd)
        conn.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        # asyncio turns Nagle off only on sockets whose proto is IPPROTO_TCP, and this one
        # says 0: without this every multi-line reply (the greeting, EHLO) waited 40 ms
        # for the client's delayed ACK, and a reconnect cost ~90 ms.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, address


def _received_at(server: SMTP) -> float:
    sock = server.transport.get_extra_info("socket") if server.transport else None
    sock = getattr(sock, "_sock", sock)  # asyncio wraps it in a TransportSocket
    return getattr(sock, "received_at", 0.0) or time.time()


# An address as mailer writes it: <local@domain>, both dot-atoms (RFC 5321), then the
# parameters. aiosmtpd parses one with the email package's header parser and declares a
# typing.Protocol class on every call: ~0.4 ms of CPU per MAIL or RCPT, a third of this
# server's CPU on a blast. Anything else (quoted local parts, routes, <>) still goes there.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDR = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*)>(?=\s|$)")


class _CountingSMTP(SMTP):
    recorder: Recorder
    mail_at = 0.0  # kernel receive time of the current transaction's MAIL command

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        match = _PLAIN_ADDR.match(arg)
        rest = arg[match.end() :].lstrip(" \t") if match else "("
        if match is None or rest.startswith("("):  # "(": a comment, the parser's to read
            return super()._getaddr(arg)
        addr = match.group(1)
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest

    def connection_made(self, transport: Any) -> None:
        with self.recorder.lock:
            self.recorder.connections += 1
        super().connection_made(transport)

    async def smtp_DATA(self, arg: str) -> None:
        rec = self.recorder
        if rec.data_plan is not None and self.envelope is not None and self.envelope.rcpt_tos:
            verdict = rec.stage_fault("DATA", rec.data_plan, self.envelope.rcpt_tos[0])
            if verdict is not None:
                await self.push(await _stage_reply(self, verdict))
                return
        await super().smtp_DATA(arg)


class _Controller(Controller):
    def __init__(self, recorder: Recorder, **kwargs: Any) -> None:
        self._recorder = recorder
        super().__init__(_Handler(recorder), **kwargs)

    def factory(self) -> SMTP:
        smtp = _CountingSMTP(self.handler, **self.SMTP_kwargs)
        smtp.recorder = self._recorder
        return smtp

    def _create_server(self) -> Any:
        """Listen on a socket of our own: port 0 lets the kernel pick a free port (no race
        with other test processes), and it hands out timestamping connections."""
        listener = _StampingListener(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.hostname, self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        return self.loop.create_server(self._factory_invoker, sock=listener, ssl=self.ssl_context)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SmtpServer:
    """Start with ``start()``; ``port`` and ``recorder`` are then ready to use."""

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        starttls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        pipelining: bool = True,
        idle_timeout: float | None = None,
    ) -> None:
        self.recorder = Recorder(pipelining=pipelining)
        kwargs: dict[str, Any] = {
            "hostname": "127.0.0.1",
            "port": 0,  # chosen by the kernel when the server starts
            "ready_timeout": 10,
            "decode_data": False,
            "data_size_limit": 10 * 1024 * 1024,
        }
        if tls_context is not None:
            kwargs["ssl_context"] = tls_context
        if starttls_context is not None:
            kwargs["tls_context"] = starttls_context
            kwargs["require_starttls"] = require_starttls
        if idle_timeout is not None:  # aiosmtpd closes a connection idle this long
            kwargs["timeout"] = idle_timeout
        self._controller = _Controller(self.recorder, **kwargs)
        self.port = 0

    def start(self) -> SmtpServer:
        self._controller.start()
        server = self._controller.server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]
        self.recorder.connections = 0  # the controller's own readiness probe
        return self

    def stop(self) -> None:
        self._controller.stop()

    @property
    def messages(self) -> list[Received]:
        with self.recorder.lock:
            return list(self.recorder.messages)

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.recorder.messages) >= count:
                return self.messages
            time.sleep(0.02)
        raise AssertionError(f"expected {count} messages, got {len(self.recorder.messages)}")
