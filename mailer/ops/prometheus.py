"""Prometheus exposition of the ops figures, for ``/metrics``.

Instead of prometheus-client's multiprocess mode (a directory of mmap files, one
machine only), the figures live in Redis and SQL (see ``mailer.stats``) and are read
when Prometheus scrapes. Collectors are synchronous, the sources are not:
``Exporter.render`` gathers a ``Figures`` snapshot with async I/O first, then lets a
registry-bound collector turn it into metric families. Redis counters restart from
zero if Redis is flushed; Prometheus treats that as a counter reset, which ``rate()``
already handles.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mailer.feed_status import metric_families
from mailer.heartbeat import ALIVE_S
from mailer.ops.figures import Figures, gather
from mailer.queue import Queue
from mailer.runtime import Runtime
from mailer.stats import COUNTER_NAMES, RATE_WINDOW_S, SMTP_BUCKETS, bound


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
            for outcome in COUNTER_NAMES.values():
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
        for upper, n in zip((*SMTP_BUCKETS, float("inf")), f.smtp_buckets, strict=True):
            running += n
            cumulative.append((bound(upper), float(running)))
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
