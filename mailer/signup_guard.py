"""Whether a sign-up may mail a confirmation: the limits that stop the form relaying.

The form lets anyone have us mail any address. Two limits, both in Redis, keep that
from becoming a weapon (docs/security.md):

- one confirmation mail per canonical address per ``MAILER_CONFIRM_RESEND_S``, so
  ``Victim+1@``, ``victim+2@`` and ``v.i.c.t.i.m@gmail.com`` count as one inbox
  (the SQL cooldown on the row only sees one spelling);
- at most ``MAILER_CONFIRM_DOMAIN_LIMIT_PER_HOUR`` confirmation mails per recipient
  domain per clock hour, so a botnet cannot point the form at one company or provider
  and spend our sending reputation there.

A refused mail changes nothing the visitor can see: the reply to ``POST /subscribe``
stays the same for every address.
"""

from __future__ import annotations

import hashlib
import logging
import time

from mailer.runtime import Runtime
from mailer.subscriptions import canonical_address

log = logging.getLogger("mailer.signup")


async def may_send_confirmation(runtime: Runtime, email: str) -> bool:
    """Claim this address's cooldown and a slot in its domain's hour; False when refused."""
    settings = runtime.settings
    canonical = canonical_address(email)
    if settings.confirm_resend_s > 0:
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:32]
        key = runtime.keys.confirm_cooldown(digest)
        if not await runtime.redis.set(key, b"1", nx=True, ex=settings.confirm_resend_s):
            return False
    limit = settings.confirm_domain_limit_per_hour
    if limit <= 0:
        return True
    domain = canonical.rpartition("@")[2]
    hour = int(time.time() // 3600)
    key = runtime.keys.confirm_domain(domain, hour)
    async with runtime.redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, 7200)
        count, _ = await pipe.execute()
    if int(count) > limit:
        if int(count) == limit + 1:  # once per domain and hour, not once per sign-up
            log.warning(
                "confirmation mails to %s reached %d this hour "
                "(MAILER_CONFIRM_DOMAIN_LIMIT_PER_HOUR); further sign-ups get no mail",
                domain,
                limit,
            )
        return False
    return True
