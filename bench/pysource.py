"""A Python stand-in for Postfix's smtp-source, used only when smtp-source is missing.

SESSIONS persistent connections each send their share of COUNT messages of SIZE bytes,
one command and reply at a time (no pipelining), like ``smtp-source -d -s S -m M -l L``.

    python bench/pysource.py HOST PORT SESSIONS COUNT SIZE

Prints one JSON line: {"sent": n, "elapsed_s": s}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def session(host: str, port: int, count: int, body: bytes) -> int:
    reader, writer = await asyncio.open_connection(host, port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            if line[3:4] != b"-":
                return line

    await reply()
    writer.write(b"EHLO pysource\r\n")
    await reply()
    for _ in range(count):
        for command in (b"MAIL FROM:<source@example.org>\r\n", b"RCPT TO:<sink@example.org>\r\n"):
            writer.write(command)
            if not (await reply()).startswith(b"250"):
                raise RuntimeError("refused")
        writer.write(b"DATA\r\n")
        await reply()
        writer.write(body)
        await reply()
    writer.write(b"QUIT\r\n")
    await reply()
    writer.close()
    return count


async def main(host: str, port: int, sessions: int, count: int, size: int) -> None:
    line = b"X" * 70 + b"\r\n"
    payload = (line * (size // len(line) + 1))[:size]
    body = b"Subject: pysource\r\n\r\n" + payload + b"\r\n.\r\n"
    shares = [count // sessions + (1 if i < count % sessions else 0) for i in range(sessions)]
    t0 = time.perf_counter()
    done = await asyncio.gather(*(session(host, port, n, body) for n in shares if n))
    elapsed = time.perf_counter() - t0
    print(json.dumps({"sent": sum(done), "elapsed_s": elapsed}))


if __name__ == "__main__":
    h, p, s, c, z = sys.argv[1:6]
    asyncio.run(main(h, int(p), int(s), int(c), int(z)))
