"""Replies to pipelined SMTP commands, read off a transport aiosmtplib opened.

``ReplyReader`` replaces aiosmtplib's protocol on a connection once it is known to
pipeline (``PipeliningSMTP`` in smtp_pipeline.py): aiosmtplib waits for each reply
before it writes the next command, and drops replies that arrive while it is not
waiting for one. Here any number of writes may be in flight, and their replies are
handed out in order (docs/smtp.md).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import aiosmtplib
from aiosmtplib.errors import SMTPReadTimeoutError

Reply = tuple[int, bytes]  # code, text lines (without the code) joined by b"\n"

# A reply longer than this without its last line is not SMTP (aiosmtplib's own bound).
MAX_REPLY = 8192 * 4


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
