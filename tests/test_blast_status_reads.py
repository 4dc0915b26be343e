"""A worker's view of a blast's status (mailer/delivery/status.py): one read at a time.

Lanes check the status before every group of messages; when the kept answer is stale,
all lanes of a process must share one read instead of each running a query, and pause,
cancel and resume must still take effect as before: "sending" is kept for at most
STATUS_TTL_S, any other answer is never kept, and never older than the lane's question.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from helpers import blast, editor_token, publish
from sqlalchemy import event, text

from mailer.config import Settings
from mailer.delivery.status import STATUS_TTL_S, BlastStatuses
from mailer.runtime import Runtime


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    rt = Runtime.create(settings)
    yield rt
    await rt.close()


def count_status_reads(runtime: Runtime) -> list[str]:
    seen: list[str] = []

    @event.listens_for(runtime.engine.sync_engine, "before_cursor_execute")
    def _count(*args: Any) -> None:
        statement = args[2]
        if "FROM blasts" in statement:
            seen.append(statement)

    return seen


async def set_status(runtime: Runtime, blast_id: int, status: str) -> None:
    async with runtime.engine.begin() as conn:
        await conn.execute(
            text("UPDATE blasts SET status = :s WHERE id = :id"), {"s": status, "id": blast_id}
        )


async def test_lanes_share_one_read_and_pause_and_resume_still_act(
    app_client: httpx.AsyncClient, settings: Settings, runtime: Runtime
) -> None:
    token = await editor_token(settings)
    bid = await blast(app_client, token, await publish(app_client, token))
    await set_status(runtime, bid, "sending")
    statuses = BlastStatuses(runtime)
    reads = count_status_reads(runtime)

    answers = await asyncio.gather(*(statuses.current(bid) for _ in range(100)))
    assert answers == ["sending"] * 100
    assert len(reads) == 1  # one read for a hundred lanes
    assert await statuses.current(bid) == "sending" and len(reads) == 1  # kept

    await set_status(runtime, bid, "paused")
    await asyncio.sleep(STATUS_TTL_S + 0.05)
    answers = await asyncio.gather(*(statuses.current(bid) for _ in range(50)))
    assert answers == ["paused"] * 50
    assert len(reads) == 2
    # "paused" is not kept: a resume is seen at once, not after the time to live.
    await set_status(runtime, bid, "sending")
    assert await statuses.current(bid) == "sending"
    assert len(reads) == 3


async def test_a_lane_never_gets_a_stop_read_before_it_asked(
    app_client: httpx.AsyncClient, settings: Settings, runtime: Runtime
) -> None:
    """A lane that joins a read which started before a resume was committed and answers
    "paused" reads again itself: the batch carries on instead of stopping."""
    token = await editor_token(settings)
    bid = await blast(app_client, token, await publish(app_client, token))
    await set_status(runtime, bid, "paused")
    statuses = BlastStatuses(runtime)
    reads = count_status_reads(runtime)
    first = asyncio.ensure_future(statuses.current(bid))  # its read starts now
    await asyncio.sleep(0)
    await set_status(runtime, bid, "sending")  # committed while that read may be under way
    late = asyncio.ensure_future(statuses.current(bid))
    assert await first in ("paused", "sending")
    assert await late == "sending"
    assert len(reads) in (1, 2)
