"""Which worker processes are alive, and what each is running: one heartbeat per process.

Heartbeats come from a small task of each process rather than the reconciler cron,
because arq runs a unique cron on one worker only. Running jobs are reported per
worker so that the jobs of a dead worker stop counting once its heartbeat is stale.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping

from redis.asyncio import Redis

from mailer.keys import Keys
from mailer.stats import SENT_LOG_KEEP_S

# The logger of the module this came from (mailer/metrics.py): JSON logs carry the name.
log = logging.getLogger("mailer.metrics")

HEARTBEAT_S = 10.0  # how often each worker process says it is alive
ALIVE_S = 90.0  # a worker silent for longer is counted as gone
FORGET_WORKER_S = 3600.0  # heartbeats of workers gone this long are deleted
HOUSEKEEPING_S = 60.0  # how often a worker trims the sent log and old heartbeats


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class WorkerBeat:
    """One per worker process: its heartbeat, its running jobs and the job counters."""

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
