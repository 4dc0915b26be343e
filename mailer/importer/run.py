"""Running an import: chunks go to SQL one transaction each, then their mails are queued.

A crash leaves whole chunks, and running the same file again finds those rows
existing and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from mailer import confirmations
from mailer.config import Settings
from mailer.db import utcnow
from mailer.importer.csvfile import check_file, read_chunks
from mailer.importer.merge import apply_chunk
from mailer.importer.report import Chunk, Report
from mailer.importer.rows import ImportOptions
from mailer.queue import Queue
from mailer.runtime import Runtime


async def _apply_with_retry(
    runtime: Runtime, chunk: Chunk, opts: ImportOptions, report: Report, now: datetime
) -> list[int]:
    """Retry a chunk that lost a race with a sign-up of one of its addresses (unique email)."""
    for attempt in range(3):
        delta = Report()
        try:
            queued = await apply_chunk(runtime, chunk, opts, delta, now)
        except IntegrityError:
            if attempt == 2:
                raise
            continue
        report.merge(delta)
        return queued
    raise AssertionError("unreachable")  # pragma: no cover


async def _enqueue(runtime: Runtime, queue: Queue, ids: list[int], due: datetime) -> None:
    """Queue the chunk's confirmation mails in one Redis round trip.

    Only after the chunk committed: a job that ran first would find nothing owed. The
    rows say the mails are owed, so if this never happens the reconciler queues them.
    """
    await queue.confirmations([(i, confirmations.job_id(runtime, i, due)) for i in ids])


async def import_csv(
    settings: Settings,
    path: Path,
    opts: ImportOptions,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Import a CSV file; ``progress(line, total_lines)`` follows the rows as they commit."""
    total = check_file(path)
    report = Report(dry_run=opts.dry_run)
    runtime = Runtime.create(settings)
    queue = None
    try:
        if not opts.dry_run:
            queue = await Queue.connect(settings)  # fail before writing, not after
        for chunk in read_chunks(path, opts, report):
            now = utcnow()
            queued = await _apply_with_retry(runtime, chunk, opts, report, now)
            if queue is not None and queued:
                await _enqueue(runtime, queue, queued, now)
                report.queued += len(queued)
            if progress is not None:
                progress(chunk.last_line, total)
    finally:
        if queue is not None:
            await queue.close()
        await runtime.close()
    return report
