"""Micro-benchmark: the per-message signatures of a blast, as made before and after ``u1``.

    .venv/bin/python bench/tokens.py [--calls 200000] [--repeats 7]

Per message a worker makes one unsubscribe token (the List-Unsubscribe URL and the link
in the body) and one Message-ID. ``old`` is what mailer did before: itsdangerous
``URLSafeSerializer(keys, salt="unsubscribe").dumps(id)`` (one serializer per process,
as ``Tokens`` kept it) and a Message-ID MAC under the secret key itself; ``new`` is
``Tokens.unsubscribe`` and ``render.make_message_id`` as they are now. The keys are a
current and an old one (a rotated installation). The cases are interleaved per repeat
and timed in this process's CPU time, which a busy machine disturbs less than wall
time; prints the median and the fastest of the repeats, in µs per call, and the load
average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import hmac
import os
import statistics
import time
import timeit
from collections.abc import Callable

from itsdangerous import URLSafeSerializer

from mailer.config import Settings
from mailer.render import make_message_id
from mailer.tokens import Tokens

CURRENT, OLD = "bench-current-secret-key-0123456789abcdef", "bench-old-secret-key-0123456789"


def old_message_id(settings: Settings, blast_id: int, subscriber_id: int) -> str:
    """render.make_message_id before the sub-key (the blast branch)."""
    domain = settings.sender_domain.encode("idna").decode()
    key = settings.signing_keys[-1].encode()
    digest = hmac.new(key, f"msgid:{blast_id}:{subscriber_id}".encode(), "sha256")
    return f"<b{blast_id}.{digest.hexdigest()[:24]}@{domain}>"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    settings = Settings(env="dev", secret_key=CURRENT, old_secret_keys=[OLD])
    keys = settings.signing_keys
    old = URLSafeSerializer(keys, salt="unsubscribe")
    new = Tokens(keys, 3600)
    sub = 1_234_567
    cases: dict[str, Callable[[], object]] = {
        "unsubscribe token, old (itsdangerous)": lambda: old.dumps(sub),
        "unsubscribe token, new (u1)": lambda: new.unsubscribe(sub),
        "Message-ID, old (raw key)": lambda: old_message_id(settings, 42, sub),
        "Message-ID, new (sub-key)": lambda: make_message_id(settings, 42, sub),
        "both, old": lambda: (old.dumps(sub), old_message_id(settings, 42, sub)),
        "both, new": lambda: (new.unsubscribe(sub), make_message_id(settings, 42, sub)),
        "read a new token": lambda: new.read_unsubscribe(new.unsubscribe(sub)),
    }
    print(f"load average {os.getloadavg()[0]:.2f}, {args.calls} calls x {args.repeats}")
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, call in cases.items():
            timer = timeit.Timer(call, timer=time.process_time)
            times[name].append(timer.timeit(args.calls) / args.calls * 1e6)
    print(f"{'µs per call':40} {'median':>7} {'min':>7}")
    for name, runs in times.items():
        print(f"{name:40} {statistics.median(runs):7.2f} {min(runs):7.2f}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
