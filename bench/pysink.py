"""A Python SMTP sink (aiosmtpd) for when Postfix's smtp-sink is not installed.

It accepts every message and prints ``mesg=N`` and a carriage return after each, like
``smtp-sink -c``. aiosmtpd caps any sender near 1,450 messages/s
(docs/design.md#costs-that-shaped-the-design), so figures measured against it only
prove that the harness works, not how fast mailer is.

    python bench/pysink.py HOST PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from aiosmtpd.smtp import SMTP


class Counter:
    def __init__(self) -> None:
        self.messages = 0
        self.sessions = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages += 1
        sys.stdout.write(f"sess={self.sessions} quit=0 mesg={self.messages}\r")
        sys.stdout.flush()
        return "250 2.0.0 Ok: queued"


async def main(host: str, port: int) -> None:
    counter = Counter()
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        counter.sessions += 1
        return SMTP(counter, hostname="pysink", decode_data=False, data_size_limit=0)

    server = await loop.create_server(factory, host, port, backlog=1000)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
