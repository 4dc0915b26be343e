"""Whether a sign-up is let in, and whether it may mail a confirmation: one Redis call.

The per-IP limit (``MAILER_SUBSCRIBE_LIMIT_PER_MINUTE``, fixed one-minute windows)
decides first. Then the form lets anyone have us mail any address, and two limits keep
that from becoming a weapon (docs/security.md):

- one confirmation mail per canonical address per ``MAILER_CONFIRM_RESEND_S``, so
  ``Victim+1@``, ``victim+2@`` and ``v.i.c.t.i.m@gmail.com`` count as one inbox
  (the SQL cooldown on the row only sees one spelling);
- at most ``MAILER_CONFIRM_DOMAIN_LIMIT_PER_HOUR`` confirmation mails per recipient
  domain per clock hour, so a botnet cannot point the form at one company or provider
  and spend our sending reputation there.

All three are one Lua script, one round trip per sign-up (they were three or four); a
request over the per-IP limit claims neither a cooldown nor a domain slot. A refused
mail changes nothing the visitor can see: the reply to ``POST /subscribe`` stays the
same for every address.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable
from typing import NamedTuple, cast

from redis.exceptions import NoScriptError

from mailer.runtime import Runtime
from mailer.subscriptions import canonical_address

log = logging.getLogger("mailer.signup")

# KEYS: the IP's window, then (when a mail is asked for) the address cooldown and the
# domain's hour. ARGV: IP limit, cooldown seconds (0: none), domain limit (0: none).
# Returns {requests from this IP in this window, 1 if a mail may go, mails to the domain}.
_ADMIT = """
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 120)
if n > tonumber(ARGV[1]) or #KEYS < 3 then return {n, 0, 0} end
if tonumber(ARGV[2]) > 0 and not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then
  return {n, 0, 0}
end
if tonumber(ARGV[3]) <= 0 then return {n, 1, 0} end
local d = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], 7200)
if d > tonumber(ARGV[3]) then return {n, 0, d} end
return {n, 1, d}
"""
_ADMIT_SHA = hashlib.sha1(_ADMIT.encode(), usedforsecurity=False).hexdigest()  # Redis names it so


class Admission(NamedTuple):
    wait: int  # seconds to wait before the IP may sign up again; 0: let in
    mail: bool  # a confirmation mail may go (False when none was asked for)


async def admit(runtime: Runtime, ip_key: str, email: str | None) -> Admission:
    """Count a sign-up from ``ip_key`` and, when ``email`` is given and the IP is within
    its limit, claim that address's cooldown and a slot in its domain's hour."""
    settings = runtime.settings
    now = time.time()
    window = int(now // 60)
    keys = [runtime.keys.subscribe_ip(ip_key, window)]
    domain = ""
    if email is not None:
        canonical = canonical_address(email)
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:32]
        domain = canonical.rpartition("@")[2]
        keys += [
            runtime.keys.confirm_cooldown(digest),
            runtime.keys.confirm_domain(domain, int(now // 3600)),
        ]
    limit = settings.confirm_domain_limit_per_hour
    argv = [str(n) for n in (settings.subscribe_limit_per_minute, settings.confirm_resend_s, limit)]
    redis = runtime.redis
    try:
        reply = await cast(Awaitable[list[int]], redis.evalsha(_ADMIT_SHA, len(keys), *keys, *argv))
    except NoScriptError:  # a Redis that has not seen it yet (EVAL caches it there)
        reply = await cast(Awaitable[list[int]], redis.eval(_ADMIT, len(keys), *keys, *argv))
    count, may, sent = reply
    if int(count) > settings.subscribe_limit_per_minute:
        return Admission(max(1, int((window + 1) * 60 - now) + 1), False)
    if int(sent) == limit + 1 and limit > 0:  # once per domain and hour, not per sign-up
        log.warning(
            "confirmation mails to %s reached %d this hour "
            "(MAILER_CONFIRM_DOMAIN_LIMIT_PER_HOUR); further sign-ups get no mail",
            domain,
            limit,
        )
    return Admission(0, bool(int(may)))
