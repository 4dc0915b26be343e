"""The Python floor for P3: the least CPU a Python program can spend per message.

A bare asyncio client on uvloop: SESSIONS persistent connections, each writing MAIL +
RCPT + DATA in one write (RFC 2920 PIPELINING), reading the three replies, then one
pre-built message with its final dot; every reply code is checked. With ``--chain`` the
next message's MAIL + RCPT + DATA go out in the same write as the previous message's
dot (one write per message). No database, no rendering, no tokens: only what any Python
sender must do to put a message on the wire.

    python bench/floor.py HOST PORT SESSIONS COUNT SIZE [--chain]

Prints one JSON line: {"sent", "elapsed_s", "cpu_s"}; ``cpu_s`` is this process's CPU
time from the first connection to the last reply (interpreter start-up excluded, as
for the worker, whose CPU is read over the blast only).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


class Session(asyncio.Protocol):
    def __init__(self) -> None:
        self.tail = b""
        self.done: asyncio.Future[list[bytes]] | None = None
        self.greeting = self.expect(1)  # the server may greet before create_connection returns

    def expect(self, n: int) -> asyncio.Future[list[bytes]]:
        self.want, self.codes = n, []
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def data_received(self, data: bytes) -> None:
        lines = (self.tail + data).split(b"\r\n")
        self.tail = lines.pop()
        self.codes += [line[:3] for line in lines if line[3:4] != b"-"]
        if len(self.codes) >= self.want and self.done and not self.done.done():
            self.done.set_result(self.codes)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done and not self.done.done():
            self.done.set_exception(ConnectionError("lost"))


async def session(host: str, port: int, first: int, count: int, body: bytes, chain: bool) -> int:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(Session, host, port)
    await proto.greeting
    wait = proto.expect(1)
    transport.write(b"EHLO floor.example.org\r\n")
    await wait

    def envelope(i: int) -> bytes:
        return b"MAIL FROM:<news@example.org>\r\nRCPT TO:<r%d@example.com>\r\nDATA\r\n" % i

    ok = [b"250", b"250", b"354"]
    wait = proto.expect(3)
    transport.write(envelope(first))
    if await wait != ok:
        raise RuntimeError("envelope refused")
    for i in range(first + 1, first + count + 1):
        last = i == first + count
        if chain and not last:
            wait = proto.expect(4)
            transport.write(body + envelope(i))
            if await wait != [b"250", *ok]:
                raise RuntimeError("refused")
            continue
        wait = proto.expect(1)
        transport.write(body)
        if await wait != [b"250"]:
            raise RuntimeError("message refused")
        if not last:
            wait = proto.expect(3)
            transport.write(envelope(i))
            if await wait != ok:
                raise RuntimeError("envelope refused")
    transport.close()
    return count


async def main(host: str, port: int, sessions: int, count: int, size: int, chain: bool) -> None:
    line = b"X" * 74 + b"\r\n"
    head = b"From: news@example.org\r\nSubject: the floor\r\n\r\n"
    body = head + (line * (size // len(line) + 1))[: size - len(head) - 2] + b"\r\n.\r\n"
    shares = [count // sessions + (1 if i < count % sessions else 0) for i in range(sessions)]
    starts = [sum(shares[:i]) for i in range(sessions)]
    t0, c0 = time.perf_counter(), time.process_time()
    done = await asyncio.gather(
        *(session(host, port, s, n, body, chain) for s, n in zip(starts, shares, strict=True) if n)
    )
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"sent": sum(done), "elapsed_s": elapsed, "cpu_s": cpu}))


if __name__ == "__main__":
    import uvloop

    h, p, s, c, z = sys.argv[1:6]
    uvloop.run(main(h, int(p), int(s), int(c), int(z), "--chain" in sys.argv[6:]))
