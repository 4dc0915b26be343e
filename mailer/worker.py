"""The worker process: arq's task side, and the composition root that wires the stages.

Only this module and ``mailer/queue.py`` import arq. Nothing in ``mailer/`` imports
this one but the ``mailer`` command; ``arq worker.WorkerSettings`` (top-level
``worker.py``) is the other way in. arq delivers at least once
(docs/design.md#arq-delivery-semantics): every task here is idempotent and keeps its
durable state in SQL; job ids only dedupe while a job is alive.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from arq import Retry, cron
from arq.connections import RedisSettings
from arq.worker import Function, Worker, func

from mailer import blasts, confirmations, reconcile
from mailer.config import Settings
from mailer.delivery import Sender
from mailer.feeds import Poller
from mailer.heartbeat import WorkerBeat
from mailer.queue import (
    POLL_FEEDS,
    RECONCILE,
    SEND_BATCH,
    SEND_CONFIRMATION,
    START_BLAST,
    Queue,
    dumps,
    loads,
)
from mailer.render import Renderer
from mailer.runtime import Runtime
from mailer.smtp import SmtpPool

log = logging.getLogger("mailer.worker")


# Task functions -----------------------------------------------------------------


def _ctx_runtime(ctx: dict[str, Any]) -> Runtime:
    runtime = ctx["runtime"]
    assert isinstance(runtime, Runtime)
    return runtime


async def send_confirmation(ctx: dict[str, Any], subscriber_id: int) -> str:
    # One try per job: a failed try is owed again in SQL and queued as a new job.
    runtime = _ctx_runtime(ctx)
    return await confirmations.send(
        runtime, ctx["queue"], ctx["smtp"], ctx["renderer"], subscriber_id
    )


async def send_batch(ctx: dict[str, Any], blast_id: int, first_id: int, last_id: int) -> str:
    return str(await ctx["sender"].run_batch(blast_id, first_id, last_id))


async def start_blast(ctx: dict[str, Any], blast_id: int) -> None:
    await blasts.start_due(_ctx_runtime(ctx), ctx["queue"], blast_id)


async def reconcile_job(ctx: dict[str, Any]) -> None:
    await reconcile.reconcile(_ctx_runtime(ctx), ctx["queue"])


@dataclass(frozen=True)
class Task:
    """One row of the task table: the name arq knows it by and how arq may run it."""

    name: str
    run: Callable[..., Awaitable[Any]]
    timeout_s: int
    max_tries: int | None = None
    keep_result: int | None = None  # None: the worker's keep_result


# After a crash the rows of a batch come back through their lease (DELIVERY_LEASE_S)
# and the reconciler, not through arq, which would re-run the job only once its
# in-progress key expired (timeout + 10 s); a re-run finds nothing left to claim.
TASKS = (
    Task(SEND_CONFIRMATION, send_confirmation, confirmations.JOB_TIMEOUT_S, max_tries=12),
    Task(SEND_BATCH, send_batch, timeout_s=120, max_tries=1000, keep_result=0),
    Task(START_BLAST, start_blast, timeout_s=300, max_tries=100, keep_result=0),
)
# Unique: arq runs it on one worker at a time, however many there are.
CRON = Task(RECONCILE, reconcile_job, timeout_s=120)


async def poll_feeds(ctx: dict[str, Any]) -> None:
    await Poller(_ctx_runtime(ctx), ctx["queue"], ctx["renderer"], ctx["smtp"]).poll()


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


def _function(task: Task) -> Function:
    return func(
        counted(task.name, task.timeout_s, task.run),
        name=task.name,
        max_tries=task.max_tries,
        timeout=task.timeout_s,
        keep_result=task.keep_result,
    )


# Worker life cycle ----------------------------------------------------------------


def make_startup(settings: Settings) -> Any:
    async def startup(ctx: dict[str, Any]) -> None:
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
    reconciler = counted(CRON.name, CRON.timeout_s, CRON.run)
    # A unique cron job's id is "<name>:<time>" and arq's job ids are global to a Redis, so
    # the name carries the queue: else one queue's reconciler takes another's turn.
    crons = [
        cron(
            reconciler,
            name=f"{settings.queue_name}:{CRON.name}",
            second=set(range(0, 60, every)),
            unique=True,
            timeout=CRON.timeout_s,
        )
    ]
    if settings.feed_urls:  # the site's feeds, polled every FEED_POLL_S (mailer/feeds.py)
        from mailer.feeds import cron_schedule

        limit = int(settings.feed_timeout_s * 2 + 60)
        feeds_job = counted(POLL_FEEDS, limit, poll_feeds)
        at, _ = cron_schedule(settings.feed_poll_s)
        crons.append(
            cron(
                feeds_job,
                name=f"{settings.queue_name}:{POLL_FEEDS}",
                second=at,
                unique=True,
                timeout=limit,
            )
        )
    values: dict[str, Any] = {
        "functions": [_function(task) for task in TASKS],
        "cron_jobs": crons,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "queue_name": settings.queue_name,
        # msgpack, not arq's pickle: a payload planted in Redis is data, never code.
        "job_serializer": dumps,
        "job_deserializer": loads,
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


def make_worker(settings: Settings, **overrides: Any) -> Any:
    """An ``arq.Worker`` with these settings: ``mailer worker`` runs it, ``mailer dev``
    runs one inside its own event loop (``handle_signals=False``)."""
    return Worker(**worker_settings(settings, **overrides))
