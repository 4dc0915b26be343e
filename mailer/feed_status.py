"""The health of the site's feeds, for ``mailer status``, ``/metrics`` and the admin UI.

A broken feed does not stop the others, so it could fail quietly for days; its last
error is kept on its row (``feeds.last_error``) and shown here until a poll succeeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mailer.models import Feed


@dataclass(frozen=True)
class FeedHealth:
    url: str
    last_polled_at: datetime | None = None
    last_ok_at: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    first_run_done: bool = False

    @property
    def ok(self) -> bool:
        """The last poll worked (a 304 included). A feed never polled yet is not ok."""
        return self.last_polled_at is not None and self.last_error is None

    @property
    def state(self) -> str:
        if self.last_polled_at is None:
            return "not polled yet"
        return "ok" if self.last_error is None else "failing"

    def as_dict(self) -> dict[str, object]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "url": self.url,
            "state": self.state,
            "last_polled_at": iso(self.last_polled_at),
            "last_ok_at": iso(self.last_ok_at),
            "last_error": self.last_error,
            "last_error_at": iso(self.last_error_at),
            "first_run_done": self.first_run_done,
        }


async def feed_health(session: AsyncSession, urls: Sequence[str]) -> list[FeedHealth]:
    """One entry per configured feed URL, in the configured order."""
    if not urls:
        return []
    rows = {f.url: f for f in await session.scalars(select(Feed).where(Feed.url.in_(urls)))}
    out = []
    for url in urls:
        feed = rows.get(url)
        if feed is None:
            out.append(FeedHealth(url))
            continue
        out.append(
            FeedHealth(
                url=url,
                last_polled_at=feed.last_polled_at,
                last_ok_at=feed.last_ok_at,
                last_error=feed.last_error,
                last_error_at=feed.last_error_at,
                first_run_done=feed.first_run_done,
            )
        )
    return out


def metric_families(feeds: Sequence[FeedHealth]) -> Iterable[Metric]:
    """``mailer_feed_up`` (alert on 0) and the time of each feed's last good poll."""
    if not feeds:
        return
    up = GaugeMetricFamily(
        "mailer_feed_up",
        "1 when the last poll of the site's feed worked (304 included), 0 when it failed "
        "or has not run yet.",
        labels=["feed"],
    )
    success = GaugeMetricFamily(
        "mailer_feed_last_success_timestamp_seconds",
        "When the site's feed was last fetched and read without error (Unix time).",
        labels=["feed"],
    )
    for feed in feeds:
        up.add_metric([feed.url], float(feed.ok))
        if feed.last_ok_at is not None:
            success.add_metric([feed.url], feed.last_ok_at.timestamp())
    yield up
    yield success
