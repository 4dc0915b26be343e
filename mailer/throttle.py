"""Global, per-domain and daily send limits, shared by every worker through Redis.

The rate limiters are GCRA in its *reserve* form: one Lua call books the next slot and
says how long to sleep, so a caller that wakes late never loses its turn (the deny and
retry form falls 10-30% short and storms Redis). Redis ``TIME`` is the only clock, so
processes on several machines agree on who goes when.

Each booking of n messages owns a stretch ``[v, v + n*T)`` of virtual time (T = 1/rate),
stretches never overlap, and the messages go out together at a moment ``s`` with
``v + (n - C)*T <= s <= v`` (C = burst capacity). That keeps every closed one-second
window at or under ``rate + C`` messages, block sends included. A domain-limited send
must go at the domain's time, so its global stretch is booked ahead of the frontier in a
sorted set that later bookings skip: a slow domain never stalls the others.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import NamedTuple, cast

from redis.asyncio import Redis

from mailer.config import Settings
from mailer.keys import Keys

_RESERVE = """
local function fmt(x) return string.format('%.17g', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n, gi, gc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local di, dc = tonumber(ARGV[4]), tonumber(ARGV[5])
local send, dtat, doff, dsend = now, 0, 0, now
if di > 0 then
  dtat = tonumber(redis.call('GET', KEYS[3]) or '0')
  doff = (n - dc) * di  -- when, within its stretch, a domain block may go
  dsend = math.max(now, math.max(dtat, now) + doff)
  send = dsend
end
if gi > 0 then
  local frontier = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', fmt(frontier))
  local v = math.max(frontier, send)
  while true do  -- first free stretch at or after v, skipping booked-ahead ones
    local r = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. fmt(v), '+inf', 'LIMIT', 0, 1)
    if #r == 0 then break end
    local a, b = string.match(r[1], '^([^:]+):([^:]+)$')
    if tonumber(a) >= v + n * gi then break end
    v = tonumber(b)
  end
  local stop = v + n * gi
  if send <= frontier then
    redis.call('SET', KEYS[1], fmt(stop), 'PX', math.ceil((stop - now) / 1000) + 1000)
  else
    redis.call('ZADD', KEYS[2], fmt(stop), fmt(v) .. ':' .. fmt(stop))
    local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
    redis.call('PEXPIRE', KEYS[2], math.ceil((tonumber(last[2]) - now) / 1000) + 1000)
  end
  send = math.max(send, v + (n - gc) * gi)
end
if di > 0 then
  -- The domain's stretch starts at its own virtual time, unless the global limit pushed
  -- the send later: then the stretch moves with it (keeping the send offset).
  local vstart = math.max(dtat, now)
  if send > dsend then vstart = send - doff end
  local stop = vstart + n * di
  redis.call('SET', KEYS[3], fmt(stop), 'PX', math.ceil((stop - now) / 1000) + 1000)
end
return math.ceil(send - now)
"""

_DAILY = """
local function fmt(x) return string.format('%.17g', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local op, n, quota, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cutoff = fmt(now - window)
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff)) do
  total = total - tonumber(string.match(m, ':(%d+)$'))
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
if redis.call('ZCARD', KEYS[1]) == 0 then total = 0 end
local changed = 0
if op == 'take' then
  changed = math.max(0, math.min(n, quota - total))
  if changed > 0 then redis.call('ZADD', KEYS[1], fmt(now), ARGV[5] .. ':' .. changed) end
  total = total + changed
elseif op == 'release' then
  changed = math.min(n, total)
  local left = changed
  while left > 0 do  -- newest grants first: the unused units are usually the latest ones
    local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
    local id, count = string.match(top[1], '^(.*):(%d+)$')
    count = tonumber(count)
    redis.call('ZREM', KEYS[1], top[1])
    if count > left then redis.call('ZADD', KEYS[1], top[2], id .. ':' .. (count - left)) end
    left = math.max(0, left - count)
  end
  total = total - changed
end
if total > 0 then
  local ttl = math.ceil(window / 1000) + 60000
  redis.call('SET', KEYS[2], total, 'PX', ttl)
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('DEL', KEYS[1], KEYS[2])
end
local wait = 0
if quota > 0 and total >= quota then
  wait = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]) + window - now
end
return {changed, total, math.ceil(wait)}
"""


LATE_S = 0.02  # woke later than this after the slot: book again rather than send late
SLACK_S = 0.05  # of the burst kept in reserve for late arrivals at the relay
MAX_REBOOKS = 5


class Slot(NamedTuple):
    waited: float  # seconds slept for it
    due: float  # the event loop's time at which the block was due to go

    def late(self) -> bool:
        """Past its slot by more than the burst held back for late sends (SLACK_S):
        sending now could overfill a window."""
        return asyncio.get_running_loop().time() - self.due > SLACK_S


class Throttle:
    """Send-rate ceilings and the rolling daily quota; 0 means unlimited for each."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        rate_per_second: float,
        burst: int,
        domain_rates: dict[str, float],
        daily_quota: int,
        daily_window_s: int,
    ) -> None:
        if rate_per_second < 0 or burst < 0 or daily_quota < 0 or daily_window_s <= 0:
            raise ValueError("throttle settings must be non-negative (window positive)")
        self.keys = keys
        self.rate = rate_per_second
        # Burst 0 still has to let one message through at a time.
        self.capacity = max(1, burst)
        # A domain may not burst past the global burst nor past its own one-second allowance.
        self.domains = {
            d.lower(): (rate, max(1, min(burst, int(rate))))
            for d, rate in domain_rates.items()
            if rate > 0
        }
        self.daily_quota = daily_quota
        self._window_us = daily_window_s * 1_000_000
        self._reserve = redis.register_script(_RESERVE)
        self._daily = redis.register_script(_DAILY)

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings) -> Throttle:
        return cls(
            redis,
            Keys(settings.queue_name),
            rate_per_second=settings.rate_per_second,
            burst=settings.rate_burst,
            domain_rates=settings.domain_rates,
            daily_quota=settings.daily_quota,
            daily_window_s=settings.daily_window_s,
        )

    def max_block(self, domain: str | None = None) -> int:
        """Largest n that may go out at once: a bigger block would break the ceiling."""
        limit = self.capacity if self.rate > 0 else sys.maxsize
        dom = self.domains.get(domain.lower()) if domain else None
        return min(limit, dom[1]) if dom else limit

    async def reserve(self, n: int = 1, domain: str | None = None) -> float:
        """Book n slots and return the seconds to wait before sending all n at once.

        The wait runs to the moment the block's *last* slot is due, so sending the whole
        block right after it keeps every one-second window within ``rate + burst``, across
        all processes; ``burst`` is how many may go at one instant after a pause (0 acts
        as 1), on top of the rate, never per process. ``n`` may not exceed
        :meth:`max_block` (ValueError): no schedule can send more than the burst at one
        instant and still hold the ceiling. A domain
        with a configured rate is booked in the same Lua call; the wait is the later of
        the two. Sending much later than told (a stalled loop) can overshoot a window.
        """
        if not 1 <= n <= self.max_block(domain):
            raise ValueError(f"n must be between 1 and {self.max_block(domain)}, got {n}")
        dom_key = domain.lower() if domain else ""
        dom = self.domains.get(dom_key)
        if self.rate <= 0 and dom is None:
            return 0.0
        keys = [self.keys.throttle_global, self.keys.throttle_global_reserved]
        # SLACK_S of the burst is held back: a block that reaches the relay a little late
        # (connection set-up, a slow query) must still not overfill its one-second window.
        capacity = max(0.0, self.capacity - SLACK_S * self.rate)
        args: list[float] = [n, 1e6 / self.rate if self.rate > 0 else 0, capacity, 0, 1]
        if dom is not None:
            keys.append(self.keys.throttle_domain(dom_key))
            args[3:] = [1e6 / dom[0], max(0.0, dom[1] - SLACK_S * dom[0])]
        wait_us = int(cast(int, await self._reserve(keys=keys, args=args)))
        return max(0, wait_us) / 1e6

    async def acquire(self, n: int = 1, domain: str | None = None) -> Slot:
        """Reserve, then sleep until the block may go; the slot says when it was due.

        A caller that wakes more than LATE_S after its slot (a CPU stall, a busy event
        loop) books again instead of going: sent late, its block would land next to the
        blocks booked after it and overfill a one-second window. The ceiling costs a slot.
        A caller with work between the slot and the send checks ``Slot.late`` after it.
        """
        loop = asyncio.get_running_loop()
        waited = 0.0
        due = loop.time()
        for _ in range(MAX_REBOOKS):
            wait = await self.reserve(n, domain)
            due = loop.time() + wait
            if wait <= 0:
                break
            await asyncio.sleep(wait)
            waited += wait
            if loop.time() - due <= LATE_S:
                break
        return Slot(waited, due)

    async def _daily_op(self, op: str, n: int = 0) -> tuple[int, int, float]:
        keys = [self.keys.daily_quota, self.keys.daily_quota_total]
        args: list[str | int] = [op, n, self.daily_quota, self._window_us, uuid.uuid4().hex]
        changed, total, wait_us = cast(list[int], await self._daily(keys=keys, args=args))
        return int(changed), int(total), max(0, int(wait_us)) / 1e6

    async def take_daily(self, n: int) -> int:
        """Grant up to n units of the rolling quota; a partial grant lets a batch go in part."""
        if n <= 0 or self.daily_quota == 0:
            return max(0, n)
        return (await self._daily_op("take", n))[0]

    async def release_daily(self, n: int) -> None:
        """Give back units granted but not sent (refused, skipped), newest grants first."""
        if self.daily_quota and n > 0:
            await self._daily_op("release", n)

    async def daily_resets_in(self) -> float:
        """Seconds until the oldest grant leaves the window; 0 while units are free."""
        return 0.0 if self.daily_quota == 0 else (await self._daily_op("status"))[2]

    async def daily_used(self) -> int:
        return (await self._daily_op("status"))[1]
