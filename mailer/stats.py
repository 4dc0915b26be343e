"""Send statistics: what a worker counts per message, and the one outcome vocabulary.

Several worker processes (on several machines) send one blast, so no process
knows the totals. Every figure lives in Redis, where all processes reach it:
counters in hashes bumped with ``HINCRBY`` in the pipeline each worker already
sends per flush of outcomes (see ``record.Recorder``), so they cost no extra
round trip per message; the SMTP latency histogram as one hash field per bucket
(non-cumulative, made cumulative at scrape time). ``mailer.ops`` reads them.
"""

from __future__ import annotations

import bisect
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis

from mailer.keys import Keys

SMTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
THROTTLE_WAIT_FIELD = "throttle_wait_seconds"
SENT_LOG_KEEP_S = 3600  # the per-second sent log holds the last hour: the chart's span
RATE_WINDOW_S = 10  # the send rate: messages of the last 10 seconds (this one included) / 10


class OutcomeStatus(StrEnum):
    """How one blast message ended. The values are written to Redis and to JSON logs."""

    sent = "sent"
    failed = "failed"
    skipped = "skipped"
    retry = "retry"  # a transient failure: the row waits for its next attempt

    @property
    def counter(self) -> str:
        """The name this outcome is counted under (reports, ``mailer_messages``)."""
        return COUNTER_NAMES[self]


# The one map from outcome to counter name, in the order /metrics lists them.
COUNTER_NAMES: dict[str, str] = {
    OutcomeStatus.sent: "sent",
    OutcomeStatus.failed: "failed",
    OutcomeStatus.skipped: "skipped",
    OutcomeStatus.retry: "retried",
}


def bound(value: float) -> str:
    """A bucket bound as Prometheus writes it ("0.5", "+Inf"); also its Redis hash field."""
    return "+Inf" if value == float("inf") else str(float(value))


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
            for upper, n in zip((*SMTP_BUCKETS, float("inf")), self._buckets, strict=True):
                if n:
                    pipe.hincrby(keys.smtp_latency, bound(upper), n)
            pipe.hincrbyfloat(keys.smtp_latency, "sum", self._sum)
        self._reset()


async def sent_per_minute(redis: Redis, keys: Keys, now: float, minutes: int = 60) -> list[int]:
    """Messages sent in each of the last ``minutes`` minutes, oldest first, this one last.

    The one read of the per-second sent log, for ``/api/queue`` and the admin chart. Only
    the fields of those minutes are fetched (HMGET), whatever else the hash holds.
    """
    this_minute = int(now) // 60 * 60
    first = this_minute - (minutes - 1) * 60
    seconds = range(first, this_minute + 60)
    values: list[Any] = await redis.hmget(keys.sent_log, [str(s) for s in seconds])  # type: ignore[misc]
    series = [0] * minutes
    for second, n in zip(seconds, values, strict=True):
        if n is not None:
            series[(second - first) // 60] += int(n)
    return series
