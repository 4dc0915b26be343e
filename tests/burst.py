"""Running the worker deterministically: arq's burst mode, and the reconciler called once.

A burst worker runs every job that is queued (deferred ones included, once due) and
returns when the queue is empty; without cron jobs, so nothing runs that the test did
not ask for.
"""

from __future__ import annotations

from typing import Any

from arq.worker import Worker

from mailer.config import Settings
from mailer.queue import Queue
from mailer.reconcile import reconcile
from mailer.runtime import Runtime
from mailer.worker import worker_settings


async def run_burst(settings: Settings, **overrides: Any) -> Worker:
    """Run a worker until the queue is empty; returns it (``jobs_complete``, ``jobs_failed``)."""
    values: dict[str, Any] = {"cron_jobs": [], "poll_delay": 0.01}
    values.update(overrides)
    worker = Worker(**worker_settings(settings, handle_signals=False, burst=True, **values))
    try:
        await worker.main()
    finally:
        await worker.close()
    return worker


async def reconcile_once(settings: Settings) -> None:
    """One pass of the reconciler, as its cron job runs it."""
    runtime = Runtime.create(settings)
    queue = await Queue.connect(settings)
    try:
        await reconcile(runtime, queue)
    finally:
        await queue.close()
        await runtime.close()
