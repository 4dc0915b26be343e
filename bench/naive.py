"""The "naive" sender of P2: what many FastAPI apps do for a newsletter.

For every recipient: build an ``email.message.EmailMessage`` (text + HTML alternative,
per-recipient unsubscribe link) and hand it to ``aiosmtplib.send``, which opens a new
SMTP connection, sends, and quits. ``--concurrency`` such sends run at once (the same
number as mailer's SMTP connections in the same run), on uvloop like uvicorn would.
The body is rendered once with mailer's own templates, so only the sending differs.

    python bench/naive.py DATABASE_URL SMTP_PORT COUNT CONCURRENCY

Prints one JSON line: {"sent": n, "failed": n, "elapsed_s": s}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from email.message import EmailMessage

import aiosmtplib
from common import STATEMENT_MD  # bench/ is sys.path[0] when run as a script
from sqlalchemy import text

from mailer.config import load_settings
from mailer.db import make_engine
from mailer.render import Renderer, StatementContent
from mailer.runtime import Runtime
from mailer.statements import render_markdown


async def main(url: str, port: int, count: int, concurrency: int) -> None:
    settings = load_settings(
        env="dev",
        database_url=url,
        smtp_port=port,
        secret_key="bench-secret-key-0123456789abcdef",
    )
    runtime = Runtime.create(settings)
    engine = make_engine(url)
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT id, email FROM subscribers WHERE status = 'confirmed'"
                    " ORDER BY id LIMIT :n"
                ),
                {"n": count},
            )
        ).all()
    await engine.dispose()
    html_body, text_body = render_markdown(STATEMENT_MD)
    content = StatementContent("A statement about the campaign", html_body, text_body, None, None)
    renderer = Renderer(settings)
    text_parts, html_parts = renderer._segments(content)  # the same templates mailer uses
    title = content.title

    gate = asyncio.Semaphore(concurrency)
    sent = failed = 0

    async def one(subscriber_id: int, email: str) -> None:
        nonlocal sent, failed
        async with gate:
            unsubscribe = runtime.unsubscribe_url(subscriber_id)
            msg = EmailMessage()
            msg["From"] = f"{settings.from_name} <{settings.from_address}>"
            msg["To"] = email
            msg["Subject"] = title
            msg["List-Unsubscribe"] = f"<{unsubscribe}>"
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
            msg.set_content(unsubscribe.join(text_parts))
            msg.add_alternative(unsubscribe.join(html_parts), subtype="html")
            try:
                await aiosmtplib.send(msg, hostname="127.0.0.1", port=port, timeout=30)
                sent += 1
            except (aiosmtplib.SMTPException, OSError):
                failed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(sid, email) for sid, email in rows))
    elapsed = time.perf_counter() - t0
    await runtime.close()
    print(json.dumps({"sent": sent, "failed": failed, "elapsed_s": elapsed}))


if __name__ == "__main__":
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
