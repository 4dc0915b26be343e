"""How long to wait before trying a transient failure again.

Shared by the confirmation job (an arq retry) and blast deliveries (a row's
``next_attempt_at``), so every retry in the system backs off the same way.
"""

from __future__ import annotations

import random


def retry_delay(attempt: int, base_s: float, cap_s: float = 3600.0) -> float:
    """Exponential backoff with ±20 % jitter, so retries of one outage don't stampede."""
    delay: float = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    return delay * random.uniform(0.8, 1.2)


def waited(attempts: int, base_s: float, cap_s: float = 3600.0) -> float:
    """How long ``attempts`` failed tries have waited in all, without the jitter.

    For work that keeps a count of its tries but not when the first one failed (a
    confirmation mail): it is given up once this passes ``MAILER_RETRY_MAX_AGE_S``.
    """
    total = 0.0
    for n in range(1, attempts + 1):
        total += min(cap_s, base_s * 2.0 ** (n - 1))
    return total
