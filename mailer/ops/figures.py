"""Ops figures read at one moment from Redis and SQL: what every ops view shows.

Workers record their figures where every process can reach them (``mailer.stats``,
``mailer.heartbeat``); state that SQL already holds (subscribers, blasts) is counted
with ``GROUP BY`` when asked. ``/metrics`` (``ops.prometheus``), ``/api/queue`` and
``mailer status`` (``ops.status``) all read a ``Figures`` snapshot gathered here, so
they always agree. A source that is down leaves its figures out instead of failing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from mailer import blasts
from mailer.blasts import Progress
from mailer.bounces.stats import totals as bounce_totals
from mailer.feed_status import FeedHealth, feed_health
from mailer.heartbeat import live_workers
from mailer.models import Blast, BlastStatus, Subscriber, SubscriberStatus
from mailer.queue import Queue
from mailer.runtime import Runtime
from mailer.stats import (
    COUNTER_NAMES,
    RATE_WINDOW_S,
    SMTP_BUCKETS,
    THROTTLE_WAIT_FIELD,
    bound,
    sent_per_minute,
)

# The logger of the module this came from (mailer/metrics.py): JSON logs carry the name.
log = logging.getLogger("mailer.metrics")


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class WorkerInfo:
    id: str
    last_seen: float
    running: int
    alive: bool


@dataclass
class Figures:
    """Everything /metrics, /api/queue and ``mailer status`` show, read at one moment."""

    at: float
    redis_up: bool = False
    database_up: bool = False
    queue: dict[str, int] = field(default_factory=dict)
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)
    messages: dict[tuple[str, str], int] = field(default_factory=dict)
    send_rate: float = 0.0
    throttle_wait_s: float = 0.0
    smtp_buckets: list[int] = field(default_factory=list)
    smtp_sum: float = 0.0
    workers: list[WorkerInfo] = field(default_factory=list)
    subscribers: dict[str, int] = field(default_factory=dict)
    blasts: dict[str, int] = field(default_factory=dict)
    bounces: dict[str, int] = field(default_factory=dict)  # stored bounce events by kind
    feeds: list[FeedHealth] = field(default_factory=list)

    @property
    def workers_alive(self) -> int:
        return sum(w.alive for w in self.workers)


async def gather(runtime: Runtime, queue: Queue) -> Figures:
    """Read every figure; a source that is down leaves its figures out instead of failing."""
    figures = Figures(at=time.time())
    try:
        await _gather_redis(runtime, queue, figures)
        figures.redis_up = True
    except Exception as exc:  # noqa: BLE001 - reported as mailer_dependency_up 0
        log.warning("metrics: Redis unavailable: %s", type(exc).__name__)
    try:
        await _gather_sql(runtime, figures)
        figures.database_up = True
    except Exception as exc:  # noqa: BLE001
        log.warning("metrics: database unavailable: %s", type(exc).__name__)
    return figures


async def _gather_redis(runtime: Runtime, queue: Queue, figures: Figures) -> None:
    keys = runtime.keys
    now = int(figures.at)
    rate_fields = [str(s) for s in range(now - RATE_WINDOW_S + 1, now + 1)]
    figures.queue = await queue.stats()
    async with runtime.redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.worker_heartbeats)
        pipe.hgetall(keys.worker_jobs)
        pipe.hgetall(keys.job_counters)
        pipe.hgetall(keys.blast_counters)
        pipe.hmget(keys.sent_log, rate_fields)
        pipe.hget(keys.counters, THROTTLE_WAIT_FIELD)
        pipe.hgetall(keys.smtp_latency)
        beats, running, jobs, by_blast, recent, wait, latency = await pipe.execute()
    alive = live_workers(beats, figures.at)
    running = {_str(k): int(v) for k, v in running.items()}
    figures.workers = sorted(
        (
            WorkerInfo(_str(w), float(t), running.get(_str(w), 0), _str(w) in alive)
            for w, t in beats.items()
        ),
        key=lambda w: w.id,
    )
    for name, value in jobs.items():
        function, _, outcome = _str(name).rpartition(":")
        figures.jobs[(function, outcome)] = int(value)
    for name, value in by_blast.items():
        blast, _, status = _str(name).partition(":")
        if status in COUNTER_NAMES:
            figures.messages[(blast, COUNTER_NAMES[status])] = int(value)
    figures.send_rate = sum(int(v) for v in recent if v is not None) / RATE_WINDOW_S
    figures.throttle_wait_s = float(wait) if wait is not None else 0.0
    latency = {_str(k): v for k, v in latency.items()}
    bounds = [bound(b) for b in (*SMTP_BUCKETS, float("inf"))]
    figures.smtp_buckets = [int(latency.get(b, 0)) for b in bounds]
    figures.smtp_sum = float(latency.get("sum", 0.0))


async def _gather_sql(runtime: Runtime, figures: Figures) -> None:
    # Reads only (``Runtime.reads``): scrapes never take or wait for SQLite's write lock.
    async with runtime.reads() as session:
        subscribers = await session.execute(
            select(Subscriber.status, func.count()).group_by(Subscriber.status)
        )
        figures.subscribers = {s.value: 0 for s in SubscriberStatus}
        figures.subscribers.update({str(s): int(n) for s, n in subscribers})
        by_status = await session.execute(select(Blast.status, func.count()).group_by(Blast.status))
        figures.blasts = {s.value: 0 for s in BlastStatus}
        figures.blasts.update({str(s): int(n) for s, n in by_status})
        figures.bounces = await bounce_totals(session)
        figures.feeds = await feed_health(session, runtime.settings.feed_urls)


async def active_blasts(runtime: Runtime) -> list[Progress]:
    """Progress of every blast not yet done or cancelled, oldest first."""
    async with runtime.reads() as session:
        ids = list(
            await session.scalars(
                select(Blast.id).where(Blast.status.in_(blasts.ACTIVE)).order_by(Blast.id)
            )
        )
        out = []
        for blast_id in ids:
            p = await blasts.progress(session, blast_id)
            if p is not None:
                out.append(p)
        return out


async def queue_overview(runtime: Runtime, queue: Queue) -> dict[str, Any]:
    """The body of ``GET /api/queue``: the queue, the rate, the workers, active blasts."""
    figures = await gather(runtime, queue)
    this_minute = int(figures.at) // 60 * 60
    series = (
        await sent_per_minute(runtime.redis, runtime.keys, figures.at) if figures.redis_up else []
    )
    start = this_minute - (len(series) - 1) * 60
    return {
        "queued": figures.queue.get("queued"),
        "in_progress": figures.queue.get("in_progress"),
        "deferred": figures.queue.get("deferred"),
        "send_rate_per_s": figures.send_rate,
        "workers": figures.workers_alive,
        "worker_heartbeats": [
            {
                "id": w.id,
                "last_seen": _iso(w.last_seen),
                "age_s": round(figures.at - w.last_seen, 1),
                "jobs": w.running,
                "alive": w.alive,
            }
            for w in figures.workers
        ],
        "blasts": [p.as_dict() for p in await active_blasts(runtime)]
        if figures.database_up
        else [],
        "sent_per_minute": [
            {"minute": _iso(start + i * 60), "sent": n} for i, n in enumerate(series)
        ],
        "redis": "ok" if figures.redis_up else "unavailable",
        "database": "ok" if figures.database_up else "unavailable",
    }


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")
