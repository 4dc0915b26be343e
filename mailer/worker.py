"""arq behind one module: the task functions, the worker settings and the enqueue side.

Everything else talks to ``Queue`` and never imports arq, so the queue could be
swapped. arq is at-least-once (FIELD-NOTES): every task here is idempotent and
keeps its durable state in SQL; job ids only dedupe while a job is alive.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from arq import Retry, cron
from arq.connections import ArqRedis, RedisSettings
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from arq.worker import Function, func
from redis.asyncio import ConnectionPool

from mailer.config import Settings
from mailer.keys import Keys
from mailer.metrics import WorkerBeat, live_workers
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
        # No ping here: a web process must start (and say "not ready") while Redis is down.
        pool = ArqRedis(
            ConnectionPool.from_url(settings.redis_url), default_queue_name=settings.queue_name
        )
        return cls(pool, settings)

    async def close(self) -> None:
        await self.pool.aclose()

    async def confirmation(self, subscriber_id: int, job_id: str) -> None:
        await self.pool.enqueue_job("send_confirmation", subscriber_id, _job_id=job_id)

    async def confirmations(self, jobs: list[tuple[int, str]]) -> None:
        """Many confirmation jobs in one round trip (imports queue thousands at once).

        arq's enqueue_job takes three round trips per job. This writes the same two keys
        per job (the job payload and its place in the queue) in one pipeline; it skips
        arq's WATCH-based dedupe, which the per-second job ids make unnecessary here.
        """
        if not jobs:
            return
        now_ms = int(time.time() * 1000)
        expires_ms = self.pool.expires_extra_ms
        async with self.pool.pipeline(transaction=False) as pipe:
            for subscriber_id, job_id in jobs:
                payload = serialize_job(
                    "send_confirmation", (subscriber_id,), {}, None, now_ms, serializer=None
                )
                pipe.psetex(job_key_prefix + job_id, expires_ms, payload)
                pipe.zadd(self.settings.queue_name, {job_id: now_ms})
            await pipe.execute()

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
        """Queued now, deferred (scheduled for later) and in progress, across all workers.

        arq leaves a running job in the queue until it ends, so the running ones are taken
        out of those due. They come from what each live worker reports (``WorkerBeat``):
        scanning arq's in-progress keys would walk the whole keyspace at every scrape.
        """
        now = time.time()
        now_ms = int(now * 1000)
        queue = self.settings.queue_name
        keys = Keys(queue)
        async with self.pool.pipeline(transaction=False) as pipe:
            pipe.zcount(queue, "-inf", now_ms)
            pipe.zcount(queue, f"({now_ms}", "+inf")
            pipe.hgetall(keys.worker_heartbeats)
            pipe.hgetall(keys.worker_jobs)
            ready, deferred, beats, running = await pipe.execute()
        alive = live_workers(beats, now)
        in_progress = sum(
            int(n)
            for w, n in running.items()
            if (w.decode() if isinstance(w, bytes) else w) in alive
        )
        return {
            "queued": max(0, int(ready) - in_progress),
            "deferred": int(deferred),
            "in_progress": in_progress,
        }


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


def counted(name: str, timeout_s: float, task: Callable[..., Awaitable[Any]]) -> Any:
    """Count how each job ends in Redis, so the figures of every worker add up.

    Counted inside the task rather than in arq's job hooks: the hooks are not told how a
    job ended, and arq's own counters live in one process (its health-check key holds
    whichever worker wrote last). Jobs arq refuses before running them (expired, too many
    tries) are not counted here.
    """

    @functools.wraps(task)
    async def run(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        beat: WorkerBeat | None = ctx.get("beat")
        if beat is None:
            return await task(ctx, *args, **kwargs)
        started = time.monotonic()
        outcome = "failed"
        await beat.job_started()
        try:
            result = await task(ctx, *args, **kwargs)
            outcome = "complete"
            return result
        except Retry:
            outcome = "retried"
            raise
        except asyncio.CancelledError:
            # arq runs a job cut by a shutdown again, but not one cut by its timeout.
            outcome = "failed" if time.monotonic() - started >= timeout_s * 0.95 else "retried"
            raise
        finally:
            try:
                await asyncio.wait_for(beat.job_ended(name, outcome), 2)
            except Exception:  # noqa: BLE001 - a lost count must not change the job's fate
                log.debug("could not count job %s", name, exc_info=True)

    return run


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
        ctx["beat"] = WorkerBeat(runtime.redis, runtime.keys)
        await ctx["beat"].start()

    return startup


async def shutdown(ctx: dict[str, Any]) -> None:
    if "beat" in ctx:
        await ctx["beat"].stop()
    if "smtp" in ctx:
        await ctx["smtp"].close()
    if "runtime" in ctx:
        await ctx["runtime"].close()


def worker_settings(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``arq.Worker``; the top-level worker.py wraps them in a class."""
    every = settings.reconcile_interval_s
    seconds = set(range(0, 60, every))
    functions: list[Function] = [
        func(
            counted("send_confirmation", 60, send_confirmation),
            name="send_confirmation",
            max_tries=12,
            timeout=60,
        ),
        # After a crash the rows of a batch come back through their lease (DELIVERY_LEASE_S)
        # and the reconciler, not through arq, which would re-run the job only once its
        # in-progress key expired (timeout + 10 s); a re-run finds nothing left to claim.
        func(
            counted("send_batch", 120, send_batch),
            name="send_batch",
            max_tries=1000,
            timeout=120,
            keep_result=0,
        ),
        func(
            counted("start_blast", 300, start_blast),
            name="start_blast",
            max_tries=100,
            timeout=300,
            keep_result=0,
        ),
    ]
    reconciler = counted("reconcile", 120, reconcile)
    # A unique cron job's id is "<name>:<time>" and arq's job ids are global to a Redis, so
    # the name carries the queue: else one queue's reconciler takes another's turn.
    cron_name = f"{settings.queue_name}:reconcile"
    values: dict[str, Any] = {
        "functions": functions,
        "cron_jobs": [cron(reconciler, name=cron_name, second=seconds, unique=True, timeout=120)],
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
