"""The throttle against a real Redis, with real OS processes competing for slots.

Ceilings are checked on the wall-clock times at which acquire() returned, over every
one-second window that starts at one of those times, so a limiter that only holds on
average (or only inside one process) fails here.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from mailer.keys import Keys
from mailer.throttle import SLACK_S, Throttle

REDIS_URL = os.environ.get("MAILER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parent.parent

# Runs in a separate interpreter: `jobs` lists (domain, tasks, n, slots) groups that
# compete inside this process; prints {domain: [acquire return times]} as JSON.
CHILD = r"""
import asyncio, json, sys, time
from redis.asyncio import Redis
from mailer.keys import Keys
from mailer.throttle import Throttle

async def main(cfg):
    r = Redis.from_url(cfg["url"])
    t = Throttle(r, Keys(cfg["queue"]), rate_per_second=cfg["rate"], burst=cfg["burst"],
                 domain_rates=cfg.get("domains", {}), daily_quota=cfg.get("quota", 0),
                 daily_window_s=cfg.get("window", 86400))
    await asyncio.sleep(max(0.0, cfg["start_at"] - time.time()))
    out, granted = {}, [0]
    async def rate_task(domain, n, left, until):
        stamps = out.setdefault(domain or "", [])
        while left[0] > 0 and time.time() < until:
            left[0] -= n
            await t.acquire(n, domain)
            stamps.extend([time.time()] * n)
    async def quota_task(n):
        while (got := await t.take_daily(n)) > 0:
            granted[0] += got
    tasks = []
    for job in cfg["jobs"]:
        left = [job["slots"]]
        for _ in range(job["tasks"]):
            if cfg.get("quota"):
                tasks.append(quota_task(job["n"]))
            else:
                until = cfg["start_at"] + job.get("duration", 60)
                tasks.append(rate_task(job["domain"], job["n"], left, until))
    await asyncio.gather(*tasks)
    await r.aclose()
    print(json.dumps({"stamps": out, "granted": granted[0]}))

asyncio.run(main(json.loads(sys.argv[1])))
"""


def run_processes(cfg: dict[str, Any], processes: int = 2) -> list[dict[str, Any]]:
    """Start the children together (a shared start time) so they really compete."""
    cfg = {"url": REDIS_URL, "start_at": time.time() + 1.0, **cfg}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(cfg)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    return results


# What a test may demand of the rate a starved process achieves. Every ceiling here is
# exact, whatever the load; the rate actually reached is not: a process the scheduler
# leaves waiting past LATE_S gives its slot up (throttle.acquire), and a 2-core machine
# running the suite in parallel does that often (a run under load 8 reached 46-79 % of
# the rate). So the floor only catches a limiter that books too few slots (half the rate,
# as one that double-counts two processes would), and the exact spacing of the bookings
# is checked without a clock (test_bookings_are_spaced_at_the_rate); how close a real
# blast comes to its rate is measured by P6 of `make bench`.
FLOOR = 0.4


def merged(results: list[dict[str, Any]], domain: str = "") -> list[float]:
    return sorted(t for r in results for t in r["stamps"].get(domain, []))


def max_window(stamps: list[float]) -> int:
    """Most stamps in any half-open one-second window starting at a stamp."""
    return max(bisect.bisect_left(stamps, t + 1.0) - i for i, t in enumerate(stamps))


def overall_rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


@pytest.fixture
async def queue() -> AsyncIterator[str]:
    name = f"test-throttle-{uuid.uuid4().hex[:8]}"
    yield name
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{name}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def rds() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    await client.ping()
    yield client
    await client.aclose()


def make(rds: aioredis.Redis, queue: str, **kw: Any) -> Throttle:
    opts: dict[str, Any] = dict(
        rate_per_second=0.0, burst=0, domain_rates={}, daily_quota=0, daily_window_s=86400
    )
    return Throttle(rds, Keys(queue), **{**opts, **kw})


@pytest.mark.parametrize(
    ("rate", "burst", "slots", "tolerance"), [(50, 5, 300, 0.10), (200, 10, 600, 0.05)]
)
@pytest.mark.slow(12)
def test_ceiling_holds_across_processes(
    queue: str, rate: int, burst: int, slots: int, tolerance: float
) -> None:
    jobs = [{"domain": None, "tasks": 8, "n": 1, "slots": slots // 2}]
    results = run_processes({"queue": queue, "rate": rate, "burst": burst, "jobs": jobs})
    stamps = merged(results)
    assert len(stamps) == slots
    assert all(r["stamps"][""] for r in results)  # both processes got slots
    peak, achieved = max_window(stamps), overall_rate(stamps)
    steady = (len(stamps) - burst) / (stamps[-1] - stamps[0])
    print(f"rate={rate} burst={burst}: max 1s window {peak}, {achieved:.2f}/s, {steady:.2f}/s")
    assert peak <= rate + burst
    assert achieved <= (1 + tolerance) * rate
    assert steady <= 1.03 * rate  # long run, once the initial burst is spent
    assert achieved >= FLOOR * rate  # see FLOOR; the exact rate: test_bookings_...


def test_blocks_keep_the_ceiling(queue: str) -> None:
    rate, burst = 100, 10
    # Blocks of 5 and of a whole burst (10) compete; each block is stamped n times at once.
    jobs = [
        {"domain": None, "tasks": 2, "n": 5, "slots": 75},
        {"domain": None, "tasks": 2, "n": 10, "slots": 80},
    ]
    stamps = merged(run_processes({"queue": queue, "rate": rate, "burst": burst, "jobs": jobs}))
    assert len(stamps) == 310
    peak, achieved = max_window(stamps), overall_rate(stamps)
    print(f"blocks of 5 and 10 at {rate}/s burst {burst}: max 1s window {peak}, {achieved:.2f}/s")
    assert peak <= rate + burst
    assert FLOOR * rate <= achieved <= 1.05 * rate


async def test_block_larger_than_burst_is_refused(rds: aioredis.Redis, queue: str) -> None:
    throttle = make(rds, queue, rate_per_second=100, burst=10, domain_rates={"a.test": 3})
    assert throttle.max_block() == 10 and throttle.max_block("A.test") == 3
    with pytest.raises(ValueError):
        await throttle.reserve(11)
    with pytest.raises(ValueError):
        await throttle.reserve(4, "a.test")
    # A full burst goes at once when idle, less the slack held back for late arrivals
    # (SLACK_S × rate = 5 slots here, so the block waits 5 slots of 10 ms).
    loop = asyncio.get_running_loop()
    start = loop.time()
    first = await throttle.reserve(10)
    assert 0.0 < first <= SLACK_S + 0.005
    # The next slot is one interval (10 ms) after the block's last. Each wait is counted
    # from Redis TIME at its own call, and a loaded machine can take longer than 10 ms
    # between the two calls, so the second wait is compared with the time that passed.
    second = await throttle.reserve(1)
    passed = loop.time() - start
    assert second <= first + 0.01 + 1e-6  # counted from a later "now": never more
    assert second + passed >= first + 0.01 - 1e-6  # the slot comes after the block


async def test_bookings_are_spaced_at_the_rate(rds: aioredis.Redis, queue: str) -> None:
    """The rate is what the limiter books: slots 1/rate apart once the burst is spent.

    The wait is counted from Redis TIME, read somewhere between sending the call and
    reading its reply, so each slot is known to lie within that stretch plus the wait.
    The checks allow for exactly that, so the load on the machine cannot move them.
    """
    # 50 ms slots: a pause of the test process between bookings (they take ~0.1 ms each)
    # would have to outlast every slot booked ahead to let one start late.
    rate, burst, n = 20, 10, 200
    throttle = make(rds, queue, rate_per_second=rate, burst=burst)
    loop = asyncio.get_running_loop()
    early: list[float] = []  # the earliest and latest each slot can be, in loop time
    late: list[float] = []
    for _ in range(n):
        sent = loop.time()
        wait = await throttle.reserve(1)
        early.append(sent + wait)
        late.append(loop.time() + wait)
    slot, eps = 1 / rate, 0.001  # Redis TIME is in microseconds, the Lua rounds to them
    for i in range(burst, n - 1):  # each next slot is one slot later, no more, no less
        assert early[i + 1] - late[i] <= slot + eps, i
        assert late[i + 1] - early[i] >= slot - eps, i
    span = (n - 1 - burst) * slot  # and so is the whole run
    assert early[-1] - late[burst] <= span + eps <= late[-1] - early[burst] + 2 * eps


def test_slow_domains_are_held_while_others_run_at_full_speed(queue: str) -> None:
    rate, burst, slow, mid = 200, 10, 5, 20
    # The limited domains stop asking after 1.5 s while fast.test goes on: their queued
    # sends must still come out of the global budget, not on top of it.
    jobs = [
        {"domain": "slow.test", "tasks": 6, "n": 1, "slots": 10_000, "duration": 1.5},
        {"domain": "mid.test", "tasks": 20, "n": 1, "slots": 10_000, "duration": 1.5},
        {"domain": "fast.test", "tasks": 8, "n": 1, "slots": 10_000, "duration": 3.5},
    ]
    domains = {"SLOW.test": slow, "mid.test": mid}
    cfg = {"queue": queue, "rate": rate, "burst": burst, "domains": domains, "jobs": jobs}
    results = run_processes(cfg)
    slow_stamps, mid_stamps = merged(results, "slow.test"), merged(results, "mid.test")
    fast_stamps = merged(results, "fast.test")
    everything = sorted(slow_stamps + mid_stamps + fast_stamps)
    busy = everything[: bisect.bisect_right(everything, fast_stamps[-1])]
    slow_peak, mid_peak, all_peak = map(max_window, (slow_stamps, mid_stamps, everything))
    after_burst = slow_stamps[slow:]  # the spacing once the initial burst is spent
    slow_steady = (len(after_burst) - 1) / (after_burst[-1] - after_burst[0])
    print(
        f"slow.test max 1s window {slow_peak}, {slow_steady:.2f}/s; mid.test max {mid_peak}; "
        f"fast.test {overall_rate(fast_stamps):.1f}/s; all domains max 1s window {all_peak}, "
        f"{overall_rate(busy):.1f}/s"
    )
    assert slow_peak <= slow + min(burst, slow)
    assert mid_peak <= mid + min(burst, mid)
    # one allowance shared by both processes, not one each; and the slow domain still gets it
    assert FLOOR * slow <= slow_steady <= 1.05 * slow
    assert all_peak <= rate + burst
    assert overall_rate(fast_stamps) >= FLOOR * (rate - slow - mid)
    assert FLOOR * rate <= overall_rate(busy) <= 1.05 * rate


async def test_unlimited_rate_waits_for_nothing(rds: aioredis.Redis, queue: str) -> None:
    throttle = make(rds, queue, rate_per_second=0, burst=0)
    assert [await throttle.reserve(1000) for _ in range(50)] == [0.0] * 50
    assert await rds.exists(Keys(queue).throttle_global) == 0
    assert await throttle.take_daily(10**6) == 10**6


async def test_idle_limiter_keys_expire(rds: aioredis.Redis, queue: str) -> None:
    throttle = make(rds, queue, rate_per_second=10, burst=1, domain_rates={"a.test": 2})
    await throttle.reserve(1)
    await throttle.reserve(1, "a.test")
    keys = Keys(queue)
    for key in (keys.throttle_global, keys.throttle_domain("a.test")):
        assert 0 < await rds.pttl(key) <= 3000


async def test_daily_quota_rolls(rds: aioredis.Redis, queue: str) -> None:
    throttle = make(rds, queue, daily_quota=100, daily_window_s=2)
    loop = asyncio.get_running_loop()
    start = loop.time()
    grants = [await throttle.take_daily(30) for _ in range(5)]
    assert grants == [30, 30, 30, 10, 0]
    assert await throttle.take_daily(150) == 0
    assert await throttle.daily_used() == 100
    resets = await throttle.daily_resets_in()
    # The first grant's window ends 2 s after it was taken, whatever the load since.
    assert 2.0 - (loop.time() - start) - 0.001 <= resets <= 2.0
    await throttle.release_daily(25)
    assert await throttle.daily_used() == 75
    assert await throttle.daily_resets_in() == 0.0
    assert await throttle.take_daily(150) == 25
    await asyncio.sleep(2.05)
    assert await throttle.daily_used() == 0
    assert await throttle.take_daily(150) == 100


def test_daily_quota_holds_across_processes(queue: str) -> None:
    jobs = [{"domain": None, "tasks": 10, "n": 3, "slots": 0}]
    results = run_processes({"queue": queue, "rate": 0, "burst": 0, "quota": 100, "jobs": jobs})
    per_process = [r["granted"] for r in results]
    print(f"daily quota 100 granted across processes: {per_process}")
    assert sum(per_process) == 100
