"""The peer of P2: fastapi-mail, what a FastAPI developer picks to send mail.

For every recipient, as its documentation shows: a ``MessageSchema`` (HTML with the text
as the alternative part, the per-recipient unsubscribe link in both, List-Unsubscribe
headers) and ``FastMail.send_message``, which opens a new SMTP connection, sends and
quits. ``CONCURRENCY`` such sends run at once (the same number as mailer's SMTP
connections in the same run), on uvloop as under uvicorn. The bodies are rendered with
mailer's own templates, so only the sending differs.

    python bench/peer.py DATABASE_URL SMTP_PORT COUNT CONCURRENCY

fastapi-mail comes with the ``bench`` extra; without it (``make install`` alone) the
same steps run on ``email.message.EmailMessage`` + ``aiosmtplib.send``, which is what
fastapi-mail does underneath, and the output says so.

Prints one JSON line: {"sent": n, "failed": n, "elapsed_s": s, "cpu_s": s, "peer": "..."};
``cpu_s`` is this process's CPU time over the sending.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import sys
import time
from collections.abc import Awaitable, Callable
from email.message import EmailMessage

import aiosmtplib
from common import STATEMENT_MD  # bench/ is sys.path[0] when run as a script
from sqlalchemy import text

from mailer.config import Settings, load_settings
from mailer.db import make_engine
from mailer.render import Renderer, StatementContent
from mailer.runtime import Runtime
from mailer.statements import render_markdown

Send = Callable[[str, str, str, str, str], Awaitable[None]]  # to, subject, html, text, unsub


def fastapi_mail_sender(settings: Settings, port: int) -> tuple[Send, str]:
    from fastapi_mail import ConnectionConfig, FastMail, MessageSchema, MessageType
    from fastapi_mail.schemas import MultipartSubtypeEnum

    config = ConnectionConfig(
        MAIL_USERNAME="",
        MAIL_PASSWORD="",
        MAIL_FROM=settings.from_address,
        MAIL_FROM_NAME=settings.from_name,
        MAIL_PORT=port,
        MAIL_SERVER="127.0.0.1",
        MAIL_STARTTLS=False,
        MAIL_SSL_TLS=False,
        USE_CREDENTIALS=False,
        TIMEOUT=30,
    )
    fm = FastMail(config)

    async def send(to: str, subject: str, html: str, plain: str, unsubscribe: str) -> None:
        message = MessageSchema(
            recipients=[to],
            subject=subject,
            body=html,
            alternative_body=plain,
            subtype=MessageType.html,
            multipart_subtype=MultipartSubtypeEnum.alternative,
            headers={
                "List-Unsubscribe": f"<{unsubscribe}>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
        )
        await fm.send_message(message)

    return send, f"fastapi-mail {importlib.metadata.version('fastapi-mail')}"


def imitation_sender(settings: Settings, port: int) -> tuple[Send, str]:
    async def send(to: str, subject: str, html: str, plain: str, unsubscribe: str) -> None:
        msg = EmailMessage()
        msg["From"] = f"{settings.from_name} <{settings.from_address}>"
        msg["To"] = to
        msg["Subject"] = subject
        msg["List-Unsubscribe"] = f"<{unsubscribe}>"
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg.set_content(plain)
        msg.add_alternative(html, subtype="html")
        await aiosmtplib.send(msg, hostname="127.0.0.1", port=port, timeout=30)

    return send, "EmailMessage + aiosmtplib.send (fastapi-mail not installed)"


async def main(url: str, port: int, count: int, concurrency: int) -> None:
    settings = load_settings(
        env="dev", database_url=url, smtp_port=port, secret_key="bench-secret-key-0123456789abcdef"
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
    text_parts, html_parts = Renderer(settings)._segments(content)  # mailer's own templates
    try:
        send, peer = fastapi_mail_sender(settings, port)
    except ImportError:
        send, peer = imitation_sender(settings, port)

    gate = asyncio.Semaphore(concurrency)
    sent = failed = 0

    async def one(subscriber_id: int, email: str) -> None:
        nonlocal sent, failed
        async with gate:
            unsubscribe = runtime.unsubscribe_url(subscriber_id)
            html, plain = unsubscribe.join(html_parts), unsubscribe.join(text_parts)
            try:
                await send(email, content.title, html, plain, unsubscribe)
                sent += 1
            except Exception:  # noqa: BLE001 - count it; the harness checks every one arrived
                failed += 1

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(sid, email) for sid, email in rows))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    await runtime.close()
    print(json.dumps({"sent": sent, "failed": failed, "elapsed_s": elapsed, "cpu_s": cpu,
                      "peer": peer}))  # fmt: skip


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
