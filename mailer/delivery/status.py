"""A worker process's view of its blasts' status: pause and cancel must act fast.

Every lane checks the status before each group of messages, so the answer is kept for
STATUS_TTL_S and read again after that, once per process and blast: the lanes (ten per
batch job, several jobs per process) that find it stale while the read is under way wait
for that read instead of sending one each. Before, all of them that came within the
round trip each opened a session (BEGIN, SELECT, ROLLBACK): about one SQL transaction
per 100 messages more than needed (bench/analysis.md, round two, step 3).
"""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import select

from mailer.models import Blast, BlastStatus
from mailer.runtime import Runtime

STATUS_TTL_S = 0.25  # how stale a batch's view of pause/cancel may be


class BlastStatuses:
    """Only "sending" is kept, and only "sending" is taken from a read that began before
    the lane asked: any other answer (paused, cancelled, done) comes from a read that
    began after the question, so a batch right after a resume never sees a stale
    "paused"."""

    def __init__(self, runtime: Runtime) -> None:
        self._reads = runtime.reads
        self._known: dict[int, tuple[float, str | None]] = {}
        self._reading: dict[int, asyncio.Future[tuple[float, str | None]]] = {}

    async def current(self, blast_id: int) -> str | None:
        asked = time.monotonic()
        known = self._known.get(blast_id)
        if known is not None and asked - known[0] < STATUS_TTL_S:
            return known[1]
        started, status = await self._join(blast_id)
        if status != BlastStatus.sending and started < asked:
            started, status = await self._join(blast_id)  # begins after the one above ended
        return status

    async def _join(self, blast_id: int) -> tuple[float, str | None]:
        """The read under way, or a new one; shielded, so a lane that is cancelled does
        not cancel the read the others wait for."""
        reading = self._reading.get(blast_id)
        if reading is None or reading.done():
            reading = asyncio.ensure_future(self._read(blast_id))
            self._reading[blast_id] = reading
        return await asyncio.shield(reading)

    async def _read(self, blast_id: int) -> tuple[float, str | None]:
        started = time.monotonic()  # what the SELECT sees was committed before this
        try:
            async with self._reads() as session:
                status = await session.scalar(select(Blast.status).where(Blast.id == blast_id))
        finally:
            self._reading.pop(blast_id, None)
        if status == BlastStatus.sending:
            self._known[blast_id] = (started, status)
        else:
            self._known.pop(blast_id, None)
        return started, status
