"""The enqueue side of the work queue: what the web process, the CLI and the reconciler use.

arq keeps its two sides apart (``arq.connections`` enqueues, ``arq.worker`` runs);
so does mailer: this module and ``mailer/worker.py`` are the only ones that import
arq, so the queue could be swapped. arq delivers at least once
(docs/design.md#arq-delivery-semantics): every task is idempotent and keeps its
durable state in SQL; job ids only dedupe while a job is alive.

Payloads and results are msgpack, never pickle (arq's default): whoever can write to
Redis must not be able to run code in every worker (docs/security.md).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import msgpack  # type: ignore[import-untyped]
from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import ConnectionPool

from mailer.config import Settings
from mailer.heartbeat import live_workers
from mailer.keys import Keys

# The task names, shared by the enqueue side and the worker's task table. They are in
# Redis (queued jobs, job counters), so renaming one strands the jobs already queued.
SEND_CONFIRMATION = "send_confirmation"
SEND_BATCH = "send_batch"
START_BLAST = "start_blast"
RECONCILE = "reconcile"
POLL_FEEDS = "poll_feeds"  # a cron job, registered only when MAILER_FEED_URLS is set


def _plain(value: object) -> str:
    """What msgpack cannot hold as data (an exception in a failed job's result) goes as text."""
    return f"{type(value).__name__}: {value}"


def dumps(data: dict[str, Any]) -> bytes:
    """arq's job serializer on both sides: data only (numbers, text, lists, maps)."""
    packed: bytes = msgpack.packb(data, use_bin_type=True, default=_plain)
    return packed


def loads(raw: bytes) -> dict[str, Any]:
    """arq's job deserializer: anything that is not one msgpack map of data is refused
    (arq then fails that one job with a logged error; the worker carries on)."""
    data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    if not isinstance(data, dict):
        raise ValueError("a job payload must be a map")
    return data


class Queue:
    """The enqueue side, used by the web process, the CLI and the reconciler."""

    def __init__(self, pool: ArqRedis, settings: Settings) -> None:
        # Whoever made the pool (the worker makes its own), payloads are msgpack here.
        pool.job_serializer, pool.job_deserializer = dumps, loads
        self.pool = pool
        self.settings = settings

    @classmethod
    async def connect(cls, settings: Settings) -> Queue:
        # No ping here: a web process must start (and say "not ready") while Redis is down.
        pool = ArqRedis(
            ConnectionPool.from_url(settings.redis_url),
            default_queue_name=settings.queue_name,
            job_serializer=dumps,
            job_deserializer=loads,
        )
        return cls(pool, settings)

    async def close(self) -> None:
        await self.pool.aclose()

    async def confirmation(self, subscriber_id: int, job_id: str, *, defer_s: float = 0) -> bool:
        """Queue one confirmation mail; False when a job of that id is still alive."""
        job = await self.pool.enqueue_job(
            SEND_CONFIRMATION,
            subscriber_id,
            _job_id=job_id,
            _defer_by=defer_s if defer_s > 0 else None,
        )
        return job is not None

    async def confirmations(self, jobs: list[tuple[int, str]], *, skip_live: bool = False) -> int:
        """Many confirmation jobs in one or two round trips (imports queue thousands at once).

        arq's enqueue_job takes three round trips per job. This writes the same two keys
        per job (the job payload and its place in the queue) in one pipeline, without
        arq's WATCH. With ``skip_live`` (the reconciler) a first pipeline leaves out the
        ids whose job is still queued, running or has its result kept; a job queued twice
        anyway costs a run that finds nothing due (``confirmations.claim`` decides in SQL).
        Returns how many jobs were written.
        """
        if jobs and skip_live:
            async with self.pool.pipeline(transaction=False) as pipe:
                for _, job_id in jobs:
                    pipe.exists(job_key_prefix + job_id, result_key_prefix + job_id)
                alive = await pipe.execute()
            jobs = [job for job, n in zip(jobs, alive, strict=True) if not n]
        if not jobs:
            return 0
        now_ms = int(time.time() * 1000)
        expires_ms = self.pool.expires_extra_ms
        async with self.pool.pipeline(transaction=False) as pipe:
            for subscriber_id, job_id in jobs:
                payload = serialize_job(
                    SEND_CONFIRMATION, (subscriber_id,), {}, None, now_ms, serializer=dumps
                )
                pipe.psetex(job_key_prefix + job_id, expires_ms, payload)
                pipe.zadd(self.settings.queue_name, {job_id: now_ms})
            await pipe.execute()
        return len(jobs)

    async def batch(
        self, job_id: str, blast_id: int, first_id: int, last_id: int, *, defer_s: float = 0
    ) -> bool:
        job = await self.pool.enqueue_job(
            SEND_BATCH,
            blast_id,
            first_id,
            last_id,
            _job_id=job_id,
            _defer_by=defer_s if defer_s > 0 else None,
        )
        return job is not None

    async def start_blast(self, job_id: str, blast_id: int, at: datetime | None) -> None:
        # A time already past means now: arq keeps a payload for its defer time + 1 day,
        # which for a time more than a day back is negative, and Redis refuses the write.
        later = at if at is not None and at.timestamp() > time.time() else None
        await self.pool.enqueue_job(START_BLAST, blast_id, _job_id=job_id, _defer_until=later)

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
