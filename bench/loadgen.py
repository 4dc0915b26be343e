"""A small HTTP/1.1 load generator for P7 when wrk is not installed.

CONNECTIONS keep-alive connections each POST a new address to URL, one request at a
time, for SECONDS; prints one JSON line like bench/subscribe.lua does for wrk.

    python bench/loadgen.py http://127.0.0.1:PORT/subscribe SECONDS CONNECTIONS TAG
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


async def client(
    host: str, port: int, path: str, tag: str, n: int, deadline: float, lat: list[float]
) -> tuple[int, int]:
    reader, writer = await asyncio.open_connection(host, port)
    errors = non2xx = 0
    i = 0
    while time.perf_counter() < deadline:
        i += 1
        body = f"email={tag}-{n}-{i}%40example.com&name=Bench+Reader".encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        t0 = time.perf_counter()
        writer.write(head + body)
        status = await reader.readline()
        if not status:
            errors += 1
            break
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await reader.readexactly(length)
        lat.append(time.perf_counter() - t0)
        if not status.split()[1].startswith(b"2"):
            non2xx += 1
    writer.close()
    return errors, non2xx


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] * 1000


async def main(url: str, seconds: float, connections: int, tag: str) -> None:
    parts = urlsplit(url)
    lat: list[float] = []
    t0 = time.perf_counter()
    deadline = t0 + seconds
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    results = await asyncio.gather(
        *(client(host, port, parts.path, tag, n, deadline, lat) for n in range(connections))
    )
    duration = time.perf_counter() - t0
    out = {
        "requests": len(lat),
        "duration_s": duration,
        "errors": sum(r[0] for r in results),
        "non2xx": sum(r[1] for r in results),
        "p50_ms": pct(lat, 50),
        "p90_ms": pct(lat, 90),
        "p99_ms": pct(lat, 99),
        "max_ms": max(lat) * 1000,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
