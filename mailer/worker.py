"""arq behind one module: the task functions, the worker settings and the enqueue side.

Everything else talks to ``Queue`` and never imports arq, so the queue could be
swapped. arq is at-least-once (FIELD-NOTES): every task here is idempotent and
keeps its durable state in SQL; job ids only dedupe while a job is alive.
"""

from __future__ import annotations

import logging
import random
from datetime import datetime
from typing import Any

from arq import Retry, cron
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Function, func

from mailer.config import Settings
from mailer.runtime import Runtime

log = logging.getLogger("mailer.worker")


def retry_delay(attempt: int, base_s: float, cap_s: float = 3600.0) -> float:
    """Exponential backoff with ±20 % jitter, so retries of one outage don't stampede."""
    delay: float = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    return delay * random.uniform(0.8, 1.2)


class Queue:
    """The enqueue side, used by the web process, the CLI and the reconciler."""

    def __init__(self, pool: ArqRedis, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings

    @classmethod
    async def connect(cls, settings: Settings) -> Queue:
        pool = await create_pool(
            RedisSettings.from_dsn(settings.redis_url), default_queue_name=settings.queue_name
        )
        return cls(pool, settings)

    async def close(self) -> None:
        await self.pool.aclose()

    async def confirmation(self, subscriber_id: int, job_id: str) -> None:
        await self.pool.enqueue_job("send_confirmation", subscriber_id, _job_id=job_id)

    async def batch(
        self, job_id: str, blast_id: int, first_id: int, last_id: int, *, defer_s: float = 0
    ) -> bool:
        job = await self.pool.enqueue_job(
            "send_batch",
            blast_id,
            first_id,
            last_id,
            _job_id=job_id,
            _defer_by=defer_s if defer_s > 0 else None,
        )
        return job is not None

    async def start_blast(self, job_id: str, blast_id: int, at: datetime | None) -> None:
        await self.pool.enqueue_job("start_blast", blast_id, _job_id=job_id, _defer_until=at)

    async def stats(self) -> dict[str, int]:
        """Queued now, deferred (scheduled for later) and in progress, across all workers."""
        import time

        now_ms = int(time.time() * 1000)
        queue = self.settings.queue_name
        ready = await self.pool.zcount(queue, "-inf", now_ms)
        deferred = await self.pool.zcount(queue, f"({now_ms}", "+inf")
        in_progress = 0
        async for _ in self.pool.scan_iter(match="arq:in-progress:" + queue + ":*", count=1000):
            in_progress += 1
        return {"queued": int(ready), "deferred": int(deferred), "in_progress": in_progress}


# Task functions -----------------------------------------------------------------


def _ctx_runtime(ctx: dict[str, Any]) -> Runtime:
    runtime = ctx["runtime"]
    assert isinstance(runtime, Runtime)
    return runtime


async def send_confirmation(ctx: dict[str, Any], subscriber_id: int) -> str:
    from mailer import confirmations

    runtime = _ctx_runtime(ctx)
    try:
        return await confirmations.send(runtime, ctx["smtp"], ctx["renderer"], subscriber_id)
    except confirmations.RetryLater as exc:
        raise Retry(defer=retry_delay(ctx["job_try"], runtime.settings.retry_base_s)) from exc


async def send_batch(ctx: dict[str, Any], blast_id: int, first_id: int, last_id: int) -> str:
    return str(await ctx["sender"].run_batch(blast_id, first_id, last_id))


async def start_blast(ctx: dict[str, Any], blast_id: int) -> None:
    from mailer import blasts

    await blasts.start_due(_ctx_runtime(ctx), ctx["queue"], blast_id)


async def reconcile(ctx: dict[str, Any]) -> None:
    from mailer import blasts

    await blasts.reconcile(_ctx_runtime(ctx), ctx["queue"])


# Worker life cycle ----------------------------------------------------------------


def make_startup(settings: Settings) -> Any:
    async def startup(ctx: dict[str, Any]) -> None:
        from mailer.delivery import Sender
        from mailer.render import Renderer
        from mailer.smtp import SmtpPool

        runtime = Runtime.create(settings)
        queue = Queue(ctx["redis"], settings)
        smtp = SmtpPool(settings)
        renderer = Renderer(settings)
        ctx.update(runtime=runtime, queue=queue, smtp=smtp, renderer=renderer)
        ctx["sender"] = Sender(runtime, queue, smtp, renderer)

    return startup


async def shutdown(ctx: dict[str, Any]) -> None:
    if "smtp" in ctx:
        await ctx["smtp"].close()
    if "runtime" in ctx:
        await ctx["runtime"].close()


def worker_settings(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``arq.Worker``; the top-level worker.py wraps them in a class."""
    every = settings.reconcile_interval_s
    seconds = set(range(0, 60, every))
    functions: list[Function] = [
        func(send_confirmation, name="send_confirmation", max_tries=12, timeout=60),
        # A batch job's timeout bounds how long its recipients stay "in flight" after a
        # crash (arq re-runs it only once its in-progress key expires: timeout + 10 s).
        func(send_batch, name="send_batch", max_tries=1000, timeout=120, keep_result=0),
        func(start_blast, name="start_blast", max_tries=100, timeout=300, keep_result=0),
    ]
    values: dict[str, Any] = {
        "functions": functions,
        "cron_jobs": [cron(reconcile, name="reconcile", second=seconds, unique=True, timeout=120)],
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "queue_name": settings.queue_name,
        "on_startup": make_startup(settings),
        "on_shutdown": shutdown,
        "health_check_interval": 30,
        "health_check_key": None,
        "max_jobs": 10,
        "poll_delay": 0.05,
        "keep_result": 60,
        "handle_signals": True,
        "allow_abort_jobs": False,
        # On SIGTERM let running batches finish (compose gives 30 s) instead of cutting them.
        "job_completion_wait": 25,
    }
    values.update(overrides)
    return values
