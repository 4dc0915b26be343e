"""``mailer status``: workers, queue depth, send rate and active blasts, for ops at a terminal.

It reads Redis and SQL directly rather than asking the web process, so it works
when web is down, on any machine that has the deployment's settings, and it
shows the same figures as ``/metrics`` because it gathers them with the same code.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from redis.exceptions import RedisError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from mailer.blasts import Progress
from mailer.bounces.stats import BlastBounces
from mailer.bounces.stats import for_blast as bounces_for_blast
from mailer.config import Settings
from mailer.errors import MailerError
from mailer.ops.figures import Figures, active_blasts, gather
from mailer.queue import Queue
from mailer.runtime import Runtime

WATCH_EVERY_S = 2.0
STATUS_STYLE = {
    "sending": "green",
    "queued": "cyan",
    "scheduled": "cyan",
    "paused": "yellow",
    "done": "dim",
    "cancelled": "red",
}


class Unavailable(MailerError):
    """Redis or the database could not be read; the message names which."""


@dataclass
class Status:
    figures: Figures
    blasts: list[Progress] = field(default_factory=list)
    bounces: dict[int, BlastBounces] = field(default_factory=dict)  # by blast id

    def problems(self) -> list[str]:
        out = []
        if not self.figures.redis_up:
            out.append("Redis (MAILER_REDIS_URL) is unreachable")
        if not self.figures.database_up:
            out.append("the database (MAILER_DATABASE_URL) is unreachable")
        return out


async def collect(runtime: Runtime, queue: Queue) -> Status:
    figures = await gather(runtime, queue)
    blasts = await active_blasts(runtime) if figures.database_up else []
    async with runtime.reads() as session:
        bounces = {p.id: await bounces_for_blast(session, p.id) for p in blasts}
    return Status(figures, blasts, bounces)


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def render(status: Status) -> RenderableType:
    f = status.figures
    at = datetime.fromtimestamp(f.at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    parts: list[RenderableType] = [Text(f"mailer status at {at}", style="bold")]
    for problem in status.problems():
        parts.append(Text(f"! {problem}", style="bold red"))

    workers = Table(title="Workers", title_justify="left", expand=False)
    workers.add_column("worker", overflow="fold")
    workers.add_column("last heartbeat")
    workers.add_column("jobs", justify="right")
    workers.add_column("state")
    for w in f.workers:
        state = Text("alive", style="green") if w.alive else Text("gone", style="red")
        workers.add_row(w.id, _age(f.at - w.last_seen), str(w.running), state)
    newest = max((w.last_seen for w in f.workers), default=None)
    workers.caption = f"{f.workers_alive} alive" + (
        f", last heartbeat {_age(f.at - newest)}" if newest is not None else ", none seen"
    )
    workers.caption_justify = "left"
    parts.append(workers)

    q = f.queue
    queue = Table(title="Queue", title_justify="left", show_header=True)
    for name in ("queued", "in progress", "deferred", "send rate"):
        queue.add_column(name, justify="right")
    if f.redis_up:
        queue.add_row(
            str(q.get("queued", 0)),
            str(q.get("in_progress", 0)),
            str(q.get("deferred", 0)),
            f"{f.send_rate:.1f}/s",
        )
    parts.append(queue)

    blasts = Table(title="Active blasts", title_justify="left")
    blasts.add_column("blast", justify="right")
    blasts.add_column("status")
    blasts.add_column("progress", min_width=12, ratio=1)
    blasts.add_column("total", justify="right")
    blasts.add_column("sent", justify="right")
    blasts.add_column("failed", justify="right")
    blasts.add_column("skipped", justify="right")
    blasts.add_column("pending", justify="right")
    blasts.add_column("hard bounces", justify="right")
    blasts.add_column("complaints", justify="right")
    blasts.add_column("reason", overflow="fold", ratio=1)
    for p in status.blasts:
        finished = p.sent + p.failed + p.skipped + p.cancelled
        total = max(p.total, finished + p.pending)
        reason = p.reason or ""
        if p.status == "scheduled" and p.send_at is not None:
            reason = reason or f"starts {p.send_at:%Y-%m-%d %H:%M:%S} UTC"
        blasts.add_row(
            str(p.id),
            Text(p.status, style=STATUS_STYLE.get(p.status, "")),
            ProgressBar(total=float(total or 1), completed=float(finished if total else 0)),
            str(p.total),
            str(p.sent),
            str(p.failed),
            str(p.skipped),
            str(p.pending),
            *_bounce_cells(status.bounces.get(p.id)),
            reason,
        )
    if not status.blasts:
        blasts.caption = "no blast is scheduled, queued, sending or paused"
        blasts.caption_justify = "left"
    parts.append(blasts)
    if f.feeds:
        parts.append(_feeds_table(f))
    return Group(*parts)


def _bounce_cells(b: BlastBounces | None) -> tuple[str, str]:
    if b is None:
        return "", ""
    return f"{b.hard} ({b.hard_rate:.1%})", f"{b.complaints} ({b.complaint_rate:.2%})"


def _feeds_table(f: Figures) -> Table:
    """The site's feeds: a failing one shows its last error until a poll works again."""
    feeds = Table(title="Site feeds", title_justify="left")
    feeds.add_column("feed", overflow="fold")
    feeds.add_column("state")
    feeds.add_column("last poll")
    feeds.add_column("last success")
    feeds.add_column("error", overflow="fold", ratio=1)
    for feed in f.feeds:
        style = {"ok": "green", "failing": "bold red"}.get(feed.state, "yellow")
        polled, ok = feed.last_polled_at, feed.last_ok_at
        feeds.add_row(
            feed.url,
            Text(feed.state, style=style),
            _age(f.at - polled.timestamp()) if polled else "never",
            _age(f.at - ok.timestamp()) if ok else "never",
            feed.last_error or "",
        )
    return feeds


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))
    except TimeoutError:
        pass


async def show(
    settings: Settings,
    *,
    watch: bool = False,
    console: Console | None = None,
    every_s: float = WATCH_EVERY_S,
) -> None:
    """Print the status once, or keep it on screen, refreshed, until SIGINT or SIGTERM.

    Raises ``Unavailable`` when a one-off status could not read Redis or the database;
    a watch keeps going and shows the problem on screen instead, as it may clear.
    """
    console = console or Console()
    runtime = Runtime.create(settings)
    queue: Queue | None = None
    try:
        await runtime.redis.ping()  # fail in a moment, not after arq's connection retries
        queue = await Queue.connect(settings)
        if not watch:
            status = await collect(runtime, queue)
            console.print(render(status))
            if status.problems():
                raise Unavailable("; ".join(status.problems()))
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            if console.is_terminal:
                with Live(console=console, auto_refresh=False) as live:
                    while not stop.is_set():
                        started = time.monotonic()
                        live.update(render(await collect(runtime, queue)), refresh=True)
                        await _pause(stop, every_s - (time.monotonic() - started))
            else:
                # Piped to a file or a pager, a live display would print only its last frame.
                while not stop.is_set():
                    started = time.monotonic()
                    console.print(render(await collect(runtime, queue)))
                    console.file.flush()
                    await _pause(stop, every_s - (time.monotonic() - started))
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    except (OSError, RedisError) as exc:  # Queue.connect gives up on an unreachable Redis
        raise Unavailable(f"Redis (MAILER_REDIS_URL) is unreachable: {type(exc).__name__}") from exc
    finally:
        if queue is not None:
            await queue.close()
        await runtime.close()
