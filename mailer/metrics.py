"""Ops figures that add up across processes: recorded in Redis by workers, read at scrape time.

Several worker processes (on several machines) send one blast, so no process
knows the totals. Instead of prometheus-client's multiprocess mode (a directory
of mmap files, one machine only), every figure lives where all processes can
reach it:

- counters in Redis hashes, bumped with ``HINCRBY`` in the pipeline each worker
  already sends per flush of outcomes (see ``record.Recorder``), so they cost no
  extra round trip per message;
- the SMTP latency histogram as one Redis hash field per bucket (non-cumulative,
  made cumulative at scrape time);
- state that SQL already holds (subscribers, blasts) counted with ``GROUP BY``
  when Prometheus scrapes.

The web process reads all of it when ``/metrics`` is scraped. Collectors are
synchronous, the sources are not: ``Exporter.render`` gathers a ``Figures``
snapshot with async I/O first, then lets a registry-bound collector turn it into
metric families. Redis counters restart from zero if Redis is flushed; Prometheus
treats that as a counter reset, which ``rate()`` already handles.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from sqlalchemy import func, select

from mailer.bounces.stats import totals as bounce_totals
from mailer.feed_status import FeedHealth, feed_health, metric_families
from mailer.keys import Keys
from mailer.models import Blast, BlastStatus, Subscriber, SubscriberStatus

if TYPE_CHECKING:
    from mailer.blasts import Progress
    from mailer.runtime import Runtime
    from mailer.worker import Queue

log = logging.getLogger("mailer.metrics")

HEARTBEAT_S = 10.0  # how often each worker process says it is alive
ALIVE_S = 90.0  # a worker silent for longer is counted as gone
FORGET_WORKER_S = 3600.0  # heartbeats of workers gone this long are deleted
HOUSEKEEPING_S = 60.0  # how often a worker trims the sent log and old heartbeats
SENT_LOG_KEEP_S = 3600  # the per-second sent log holds the last hour: the chart's span
RATE_WINDOW_S = 10  # the send rate: messages of the last 10 seconds (this one included) / 10
SMTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OUTCOMES = {"sent": "sent", "failed": "failed", "skipped": "skipped", "retry": "retried"}
THROTTLE_WAIT_FIELD = "throttle_wait_seconds"


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bound(value: float) -> str:
    """A bucket bound as Prometheus writes it ("0.5", "+Inf"); also its Redis hash field."""
    return "+Inf" if value == float("inf") else str(float(value))


# Recording, in worker processes ---------------------------------------------------------


class SendStats:
    """Figures a worker gathers between two flushes of outcomes, written with that flush.

    Timing every SMTP transaction and every throttle wait is cheap in memory; writing each
    to Redis is not, so they ride along in the pipeline the recorder sends anyway.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.throttle_wait_s = 0.0
        self._buckets = [0] * (len(SMTP_BUCKETS) + 1)
        self._sum = 0.0

    def observe_smtp(self, seconds: float) -> None:
        self._buckets[bisect.bisect_left(SMTP_BUCKETS, seconds)] += 1
        self._sum += seconds

    def drain_into(self, pipe: Any, keys: Keys) -> None:
        """Queue the gathered figures on a Redis pipeline and start again from zero."""
        if self.throttle_wait_s > 0:
            pipe.hincrbyfloat(keys.counters, THROTTLE_WAIT_FIELD, self.throttle_wait_s)
        if any(self._buckets):
            for bound, n in zip((*SMTP_BUCKETS, float("inf")), self._buckets, strict=True):
                if n:
                    pipe.hincrby(keys.smtp_latency, _bound(bound), n)
            pipe.hincrbyfloat(keys.smtp_latency, "sum", self._sum)
        self._reset()


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class WorkerBeat:
    """One per worker process: its heartbeat, its running jobs and the job counters.

    Heartbeats come from a small task of each process rather than the reconciler cron,
    because arq runs a unique cron on one worker only. Running jobs are reported per
    worker so that the jobs of a dead worker stop counting once its heartbeat is stale.
    """

    def __init__(self, redis: Redis, keys: Keys, worker_id: str | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.id = worker_id or new_worker_id()
        self.running = 0
        self._task: asyncio.Task[None] | None = None
        self._last_housekeeping = 0.0

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._loop(), name=f"heartbeat {self.id}")

    async def stop(self) -> None:
        """Leave the roll at once on a clean exit, instead of fading out after ALIVE_S."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hdel(self.keys.worker_heartbeats, self.id)
                pipe.hdel(self.keys.worker_jobs, self.id)
                await pipe.execute()
        except Exception:  # noqa: BLE001 - a stale heartbeat simply ages out
            log.debug("could not remove heartbeat of %s", self.id, exc_info=True)

    async def beat(self) -> None:
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.worker_heartbeats, self.id, f"{now:.3f}")
            pipe.hset(self.keys.worker_jobs, self.id, str(self.running))
            await pipe.execute()
        if now - self._last_housekeeping >= HOUSEKEEPING_S:
            self._last_housekeeping = now
            await housekeeping(self.redis, self.keys, now)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self.beat()
            except Exception:  # noqa: BLE001 - Redis away: the next beat tries again
                log.warning("worker %s: heartbeat failed", self.id, exc_info=True)

    async def job_started(self) -> None:
        self.running += 1
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.worker_jobs, self.id, str(self.running))
            await pipe.execute()

    async def job_ended(self, function: str, outcome: str) -> None:
        self.running = max(0, self.running - 1)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.worker_jobs, self.id, str(self.running))
            pipe.hincrby(self.keys.job_counters, f"{function}:{outcome}", 1)
            await pipe.execute()


async def housekeeping(redis: Redis, keys: Keys, now: float) -> None:
    """Keep the per-second sent log to its last hour and forget long-gone workers."""
    old = int(now) - SENT_LOG_KEEP_S
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hkeys(keys.sent_log)
        pipe.hgetall(keys.worker_heartbeats)
        seconds, beats = await pipe.execute()
    stale = [f for f in seconds if int(f) < old]
    gone = [w for w, t in beats.items() if now - float(t) > FORGET_WORKER_S]
    async with redis.pipeline(transaction=False) as pipe:
        for start in range(0, len(stale), 1000):
            pipe.hdel(keys.sent_log, *stale[start : start + 1000])
        if gone:
            pipe.hdel(keys.worker_heartbeats, *gone)
            pipe.hdel(keys.worker_jobs, *gone)
        await pipe.execute()


def live_workers(heartbeats: Mapping[bytes | str, bytes | str], now: float) -> set[str]:
    return {_str(w) for w, t in heartbeats.items() if now - float(t) <= ALIVE_S}


# Reading, at scrape time -------------------------------------------------------------


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
        beats, running, jobs, blasts, recent, wait, latency = await pipe.execute()
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
    for name, value in blasts.items():
        blast, _, status = _str(name).partition(":")
        if status in OUTCOMES:
            figures.messages[(blast, OUTCOMES[status])] = int(value)
    figures.send_rate = sum(int(v) for v in recent if v is not None) / RATE_WINDOW_S
    figures.throttle_wait_s = float(wait) if wait is not None else 0.0
    latency = {_str(k): v for k, v in latency.items()}
    bounds = [_bound(b) for b in (*SMTP_BUCKETS, float("inf"))]
    figures.smtp_buckets = [int(latency.get(b, 0)) for b in bounds]
    figures.smtp_sum = float(latency.get("sum", 0.0))


async def _gather_sql(runtime: Runtime, figures: Figures) -> None:
    async with runtime.sessions() as session:
        subscribers = await session.execute(
            select(Subscriber.status, func.count()).group_by(Subscriber.status)
        )
        figures.subscribers = {s.value: 0 for s in SubscriberStatus}
        figures.subscribers.update({str(s): int(n) for s, n in subscribers})
        blasts = await session.execute(select(Blast.status, func.count()).group_by(Blast.status))
        figures.blasts = {s.value: 0 for s in BlastStatus}
        figures.blasts.update({str(s): int(n) for s, n in blasts})
        figures.bounces = await bounce_totals(session)
        figures.feeds = await feed_health(session, runtime.settings.feed_urls)


async def active_blasts(runtime: Runtime) -> list[Progress]:
    """Progress of every blast not yet done or cancelled, oldest first."""
    from mailer import blasts

    async with runtime.sessions() as session:
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


async def sent_per_minute(redis: Redis, keys: Keys, now: float, minutes: int = 60) -> list[int]:
    """Messages sent in each of the last ``minutes`` minutes, oldest first, this one last."""
    this_minute = int(now) // 60 * 60
    first = this_minute - (minutes - 1) * 60
    series = [0] * minutes
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.sent_log)
        (by_second,) = await pipe.execute()
    for second, n in by_second.items():
        s = int(second)
        if first <= s < this_minute + 60:
            series[(s - first) // 60] += int(n)
    return series


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


# Prometheus exposition --------------------------------------------------------------


class FiguresCollector(Collector):
    """Turns the snapshot the scrape just gathered into metric families."""

    def __init__(self) -> None:
        self.figures: Figures | None = None

    def collect(self) -> Iterable[Metric]:
        f = self.figures
        if f is None:
            return
        up = GaugeMetricFamily(
            "mailer_dependency_up",
            "Whether the web process could read the figures from this dependency.",
            labels=["dependency"],
        )
        up.add_metric(["redis"], float(f.redis_up))
        up.add_metric(["database"], float(f.database_up))
        yield up
        if f.redis_up:
            yield from self._redis_families(f)
        if f.database_up:
            subscribers = GaugeMetricFamily(
                "mailer_subscribers", "Subscribers by status.", labels=["status"]
            )
            for status, n in sorted(f.subscribers.items()):
                subscribers.add_metric([status], n)
            yield subscribers
            blasts = GaugeMetricFamily("mailer_blasts", "Blasts by status.", labels=["status"])
            for status, n in sorted(f.blasts.items()):
                blasts.add_metric([status], n)
            yield blasts
            yield from _bounce_families(f)
            yield from metric_families(f.feeds)

    @staticmethod
    def _redis_families(f: Figures) -> Iterable[Metric]:
        queue = GaugeMetricFamily(
            "mailer_queue_jobs",
            "Jobs in the work queue: queued (due now), deferred (due later), in progress.",
            labels=["state"],
        )
        for state in ("queued", "deferred", "in_progress"):
            queue.add_metric([state], f.queue.get(state, 0))
        yield queue
        jobs = CounterMetricFamily(
            "mailer_jobs",
            "Jobs ended in any worker, by task function and outcome (complete, failed, retried).",
            labels=["function", "outcome"],
        )
        for (function, outcome), n in sorted(f.jobs.items()):
            jobs.add_metric([function, outcome], n)
        yield jobs
        messages = CounterMetricFamily(
            "mailer_messages",
            "Blast messages recorded, by blast and outcome (sent, failed, retried, skipped).",
            labels=["blast", "outcome"],
        )
        # Every outcome of a blast from its first message on, so rate() sees each one start.
        for blast in sorted({b for b, _ in f.messages}, key=_blast_order):
            for outcome in OUTCOMES.values():
                messages.add_metric([blast, outcome], f.messages.get((blast, outcome), 0))
        yield messages
        yield GaugeMetricFamily(
            "mailer_send_rate_per_second",
            f"Messages sent per second over the last {RATE_WINDOW_S} s, all workers together.",
            value=f.send_rate,
        )
        yield CounterMetricFamily(
            "mailer_throttle_wait_seconds",
            "Time workers spent waiting for the rate limiter, summed over all send lanes.",
            value=f.throttle_wait_s,
        )
        cumulative, running = [], 0
        for bound, n in zip((*SMTP_BUCKETS, float("inf")), f.smtp_buckets, strict=True):
            running += n
            cumulative.append((_bound(bound), float(running)))
        yield HistogramMetricFamily(
            "mailer_smtp_transaction_seconds",
            "Time to hand one blast message to the relay: a pooled connection, the transaction.",
            buckets=cumulative,
            sum_value=f.smtp_sum,
        )
        yield GaugeMetricFamily(
            "mailer_workers_alive",
            f"Worker processes whose heartbeat is newer than {ALIVE_S:.0f} s.",
            value=f.workers_alive,
        )


def _bounce_families(f: Figures) -> Iterable[Metric]:
    """Counted in SQL at scrape time: the bounce_events table is the record (never trimmed)."""
    bounces = CounterMetricFamily(
        "mailer_bounces",
        "Bounce reports and events stored once each, by kind: hard, soft, complaint, "
        "policy, ignored, unmatched (no signed evidence of who).",
        labels=["kind"],
    )
    for kind, n in sorted(f.bounces.items()):
        bounces.add_metric([kind], n)
    yield bounces
    yield CounterMetricFamily(
        "mailer_complaints",
        "Spam complaints (ARF reports, provider complaint events) stored.",
        value=f.bounces.get("complaint", 0),
    )


def _blast_order(blast: str) -> int:
    return int(blast) if blast.isdigit() else -1


class Exporter:
    """One per web app: a private registry, so apps (and tests) never share metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = FiguresCollector()
        self.registry.register(self.collector)

    async def render(self, runtime: Runtime, queue: Queue) -> bytes:
        figures = await gather(runtime, queue)
        # No await between these two lines: concurrent scrapes can't mix their snapshots.
        self.collector.figures = figures
        return generate_latest(self.registry)
