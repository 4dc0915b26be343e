"""Running an import: chunks go to SQL one transaction each, then their mails are queued.

A crash leaves whole chunks, and running the same file again finds those rows
existing and changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from mailer.config import Settings
from mailer.importer.csvfile import check_file, read_chunks
from mailer.importer.merge import apply_chunk
from mailer.importer.report import Chunk, Report
from mailer.importer.rows import ImportOptions
from mailer.queue import Queue
from mailer.runtime import Runtime


async def _apply_with_retry(
    runtime: Runtime, chunk: Chunk, opts: ImportOptions, report: Report
) -> list[int]:
    """Retry a chunk that lost a race with a sign-up of one of its addresses (unique email)."""
    for attempt in range(3):
        delta = Report()
        try:
            queued = await apply_chunk(runtime, chunk, opts, delta)
        except IntegrityError:
            if attempt == 2:
                raise
            continue
        report.merge(delta)
        return queued
    raise AssertionError("unreachable")  # pragma: no cover


async def _enqueue(runtime: Runtime, queue: Queue, ids: list[int]) -> None:
    """Queue the chunk's confirmation mails in one Redis round trip.

    Only after the chunk committed: a job that ran first would find no pending row.
    """
    stamp = int(time.time())
    await queue.confirmations([(i, runtime.keys.confirm_job_id(i, stamp)) for i in ids])


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
            queued = await _apply_with_retry(runtime, chunk, opts, report)
            if queue is not None and queued:
                await _enqueue(runtime, queue, queued)
                report.queued += len(queued)
            if progress is not None:
                progress(chunk.last_line, total)
    finally:
        if queue is not None:
            await queue.close()
        await runtime.close()
    return report
