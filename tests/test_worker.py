"""The worker as a neighbour: queues that share a Redis, and a test worker that stops cleanly."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import redis.asyncio as aioredis
from helpers import clean_redis, wait_until

from mailer.config import Settings


async def test_queues_sharing_a_redis_each_run_their_own_reconciler(
    settings: Settings, redis: aioredis.Redis, start_worker: Any
) -> None:
    """arq's job ids are global to a Redis: the reconciler's cron entry of one queue must not
    take the place of another queue's entry for the same second (parallel tests, or two
    deployments on one Redis)."""
    other = settings.model_copy(update={"queue_name": f"test-{uuid.uuid4().hex[:10]}"})
    try:
        await start_worker()
        await start_worker(settings=other)

        async def ticks(queue: str) -> set[float]:
            return {score for _, score in await redis.zrange(queue, 0, -1, withscores=True)}

        async def same_tick_in_both() -> bool:
            return bool(await ticks(settings.queue_name) & await ticks(other.queue_name))

        await wait_until(same_tick_in_both, timeout=5)
    finally:
        await clean_redis(redis, other.queue_name)


async def test_closing_a_worker_with_a_running_job_raises_nothing(
    settings: Settings, start_worker: Any
) -> None:
    """The running job is cancelled and its cancellation absorbed; the pool is closed."""
    worker = await start_worker()
    started = asyncio.Event()

    async def long_job(ctx: dict[str, Any]) -> None:
        started.set()
        await asyncio.sleep(60)

    job = asyncio.create_task(long_job({}))
    worker.tasks["held"] = job  # as arq holds its running jobs
    await asyncio.wait_for(started.wait(), 5)
    await worker.close()
    assert job.cancelled() and worker.tasks == {}
    assert worker._pool is None  # arq's close() ran to its end
    await worker.close()  # twice is harmless
