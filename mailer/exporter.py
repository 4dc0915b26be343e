"""Subscribers to CSV, streamed: the list can be far larger than memory.

The columns are exactly what ``mailer subscribers import`` reads, so an export
imported elsewhere keeps every subscriber, status and consent record. Cells that a
spreadsheet would run as a formula are neutralised (``mailer.csvsafe``); the import
undoes exactly that, so the round trip is lossless.
"""

from __future__ import annotations

import csv
from datetime import datetime
from typing import TextIO

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from mailer.csvsafe import neutralise
from mailer.db import readonly
from mailer.models import Subscriber

COLUMNS = (
    "email",
    "name",
    "status",
    "created_at",
    "confirmed_at",
    "unsubscribed_at",
    "consent_at",
    "consent_ip",
    "consent_source",
)
PAGE_ROWS = 1000


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    return neutralise(str(value))


async def export_csv(engine: AsyncEngine, out: TextIO, status: str | None = None) -> int:
    """Write the header and every subscriber (optionally of one status); return the count.

    Pages by id (keyset), each page its own short read, so a long export never holds a
    transaction (or, on SQLite, a snapshot that stops the WAL from checkpointing) open.
    """
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    columns = [Subscriber.id] + [getattr(Subscriber, c) for c in COLUMNS]
    reads = readonly(engine)  # on SQLite, pages never take (or wait for) the write lock
    last_id = 0
    count = 0
    while True:
        query = select(*columns).where(Subscriber.id > last_id)
        if status is not None:
            query = query.where(Subscriber.status == status)
        async with reads.connect() as conn:
            rows = (await conn.execute(query.order_by(Subscriber.id).limit(PAGE_ROWS))).all()
        if not rows:
            return count
        for row in rows:
            writer.writerow([_cell(v) for v in row[1:]])
        count += len(rows)
        last_id = rows[-1][0]
