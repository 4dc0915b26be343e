"""Micro-benchmark: one process sending a real blast message into smtp-sink, by SMTP path.

    python bench/smtp_micro.py [--messages 20000] [--repeats 3] [--connections 10]

Variants, interleaved per repeat, all on uvloop in this process, CONNECTIONS persistent
connections and twice as many sending tasks (as the worker's lanes outnumber its SMTP
connections):

- ``aiosmtplib``: ``aiosmtplib.SMTP.sendmail`` on each connection (mailer before
  pipelining, minus the pool);
- ``pool unpipelined``: ``mailer.smtp.SmtpPool`` with pipelining off (the fallback path);
- ``pool pipelined``: ``SmtpPool`` as mailer runs it against a server with PIPELINING;
- ``floor``, ``floor chained``: bench/floor.py's bare sender (the reference of P3), and
  its variant that writes the next envelope with the previous message's dot.

CPU is this process's (``time.process_time``) over the sending; the sink runs apart.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import aiosmtplib
from common import Sink, load_average, sample_message
from floor import session as floor_session

from mailer.config import load_settings
from mailer.smtp import SmtpPool

SENDER = "updates@news.example.org"


async def fan_out(count: int, tasks: int, send: Callable[[int], Awaitable[None]]) -> None:
    todo = iter(range(count))

    async def lane() -> None:
        for i in todo:
            await send(i)

    await asyncio.gather(*(lane() for _ in range(tasks)))


async def run_aiosmtplib(port: int, n: int, conns: int, data: bytes) -> None:
    idle: asyncio.LifoQueue[aiosmtplib.SMTP] = asyncio.LifoQueue()
    for _ in range(conns):
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await client.connect()
        idle.put_nowait(client)

    async def send(i: int) -> None:
        client = await idle.get()
        try:
            await client.sendmail(SENDER, [f"r{i}@example.com"], data)
        finally:
            idle.put_nowait(client)

    await fan_out(n, conns * 2, send)
    while not idle.empty():
        await idle.get_nowait().quit()


async def run_pool(port: int, n: int, conns: int, data: bytes, pipelining: bool) -> None:
    settings = load_settings(env="dev", smtp_host="127.0.0.1", smtp_port=port, secret_key="x" * 32)
    pool = SmtpPool(settings, size=conns)
    for client in pool._idle._queue:  # the bench's switch; mailer decides by the server
        client.use_pipelining = pipelining

    async def send(i: int) -> None:
        await pool.send(SENDER, f"r{i}@example.com", data)

    await fan_out(n, conns * 2, send)
    assert pool.stats.pipelined == (n if pipelining else 0)
    await pool.close()


async def run_floor(port: int, n: int, conns: int, data: bytes, chain: bool) -> None:
    body = data + b".\r\n"
    shares = [n // conns + (1 if i < n % conns else 0) for i in range(conns)]
    starts = [sum(shares[:i]) for i in range(conns)]
    sessions = zip(starts, shares, strict=True)
    await asyncio.gather(
        *(floor_session("127.0.0.1", port, s, k, body, chain) for s, k in sessions)
    )


async def main(args: argparse.Namespace) -> None:
    sink = Sink().start()
    data = sample_message(
        {"env": "dev", "base_url": "https://news.example.org", "secret_key": "x" * 32}
    )  # the message the worker sends in P1 (render.py's bytes)
    variants: dict[str, Callable[[], Awaitable[None]]] = {
        "aiosmtplib": lambda: run_aiosmtplib(sink.port, args.messages, args.connections, data),
        "pool unpipelined": lambda: run_pool(
            sink.port, args.messages, args.connections, data, False
        ),
        "pool pipelined": lambda: run_pool(sink.port, args.messages, args.connections, data, True),
        "floor": lambda: run_floor(sink.port, args.messages, args.connections, data, False),
        "floor chained": lambda: run_floor(sink.port, args.messages, args.connections, data, True),
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",") + ["floor"]}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    rate: dict[str, list[float]] = {k: [] for k in variants}
    load = load_average()
    try:
        for rep in range(args.repeats):
            names = list(variants)
            names = names[rep % len(names) :] + names[: rep % len(names)]
            for name in names:
                before = sink.messages()
                t0, c0 = time.perf_counter(), time.process_time()
                await variants[name]()
                wall, used = time.perf_counter() - t0, time.process_time() - c0
                sink.wait_for(before + args.messages)
                cpu[name].append(used / args.messages * 1e6)
                rate[name].append(args.messages / wall)
    finally:
        sink.stop()
    print(
        f"{args.messages:,} messages of {len(data):,} bytes per run, {args.connections} "
        f"connections, {args.repeats} repeats interleaved, {sink.kind}; load average before "
        f"{load[0]:.2f}, after {load_average()[0]:.2f} ({os.cpu_count()} cores)\n"
    )
    print("| path | msg/s | sender CPU µs/msg | CPU ÷ floor |")
    print("| --- | --- | --- | --- |")
    floor = statistics.median(cpu["floor"])
    for name in variants:
        c, r = cpu[name], rate[name]
        print(
            f"| {name} | {statistics.median(r):,.0f} ({min(r):,.0f}–{max(r):,.0f}) | "
            f"{statistics.median(c):.0f} ({min(c):.0f}–{max(c):.0f}) | "
            f"{statistics.median(c) / floor:.2f} |"
        )


if __name__ == "__main__":
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated paths (the floor always runs)")
    uvloop.run(main(parser.parse_args()))
