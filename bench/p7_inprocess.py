"""POST /subscribe driven in process: CPU per sign-up without an HTTP server or wrk.

P7 (bench/harness.py --only P7) measures one uvicorn process under wrk on a shared
machine; this calls the ASGI app directly (raw scope, receive, send) on a fresh
PostgreSQL database with the P7 web settings, so the CPU the process spends per
sign-up (app, SQLAlchemy/asyncpg, Redis client, event loop) can be compared between
two versions of the code in a few seconds and profiled without uvicorn in the way:

    python bench/p7_inprocess.py --requests 4000 --concurrency 32
    py-spy record --format raw -o /tmp/p7.raw -- python bench/p7_inprocess.py
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

from common import clean_redis, pg_create, pg_drop
from harness import web_settings

from mailer.config import load_settings
from mailer.web.app import create_app


async def post(app: Any, body: bytes) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/subscribe",
        "raw_path": b"/subscribe",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/x-www-form-urlencoded"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    sent = False
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client never goes away
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]


async def main(args: argparse.Namespace) -> None:
    stamp = int(time.time())
    db = f"mailer_bench_{stamp}_inproc"
    url = await pg_create(db)
    queue = f"bench-inproc-{uuid.uuid4().hex[:8]}"
    app = create_app(load_settings(**web_settings(url, queue)))
    tag = uuid.uuid4().hex[:6]

    async def load(prefix: str, count: int) -> None:
        async def lane(first: int) -> None:
            for i in range(first, count, args.concurrency):
                body = f"email={prefix}-{i}%40example.com&name=Bench+Reader".encode()
                status = await post(app, body)
                if status != 202:
                    raise RuntimeError(f"POST /subscribe answered {status}")

        await asyncio.gather(*(lane(c) for c in range(args.concurrency)))

    try:
        async with app.router.lifespan_context(app):
            await load(f"w{tag}", args.warmup)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await load(f"m{tag}", args.requests)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        print(
            f"{args.requests} sign-ups, {args.concurrency} in flight: "
            f"{cpu / args.requests * 1e3:.3f} ms CPU each, {args.requests / wall:,.0f} per second"
        )
    finally:
        await clean_redis(queue)
        await pg_drop(db)


if __name__ == "__main__":
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=300)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main(parser.parse_args()))
