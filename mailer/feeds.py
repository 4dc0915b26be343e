"""Statements that arrive from the site by themselves: the feed poller.

Each poll fetches the site's feeds (``mailer/feed_fetch.py``), each on its own, so one
broken feed never stops the others; its error is kept on its row for ops
(``mailer/feed_status.py``). What a poll does with a feed's entries (docs/feeds.md):

- **first successful poll**: every entry present is recorded as seen and never mailed,
  so turning the poller on cannot mail the site's whole backlog;
- **later polls**: an entry is new unless its key (guid / id, else its link) or its link
  is already known: a site that changes its guids does not re-send its statements.
  A new entry becomes a statement (``source = "feed"``) whose body is the CMS HTML made
  fit for email (``mailer/cms_html.py``) and whose URL is the entry's link;
- then the mode's action (``mailer/feed_actions.py``): held for the editors, or blasted.

The entry row and its statement are written in one transaction, and the unique key per
feed makes a second, concurrent poll lose that insert; the action is owed until
``handled_at`` is set, so a crash between the two is made good by the next poll, and a
statement that already has a blast is never given a second one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from typing import Any

from redis.exceptions import LockError
from sqlalchemy import insert as core_insert
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from mailer.cms_html import render_cms_html
from mailer.db import utcnow
from mailer.feed_actions import Actions
from mailer.feed_fetch import FeedError, FeedItem, Fetched, fetch, make_client
from mailer.models import STATEMENT_FROM_SITE, Feed, FeedEntry, Statement
from mailer.queue import Queue
from mailer.render import Renderer
from mailer.runtime import Runtime
from mailer.smtp import SmtpPool

log = logging.getLogger("mailer.feeds")


def cron_schedule(poll_s: int) -> tuple[set[int], float]:
    """(seconds of each minute the poller's cron runs, slack): a feed is due once its last
    poll is ``poll_s - slack`` old, so a cron tick a moment early still polls it."""
    if poll_s < 60 and 60 % poll_s == 0:
        return set(range(0, 60, poll_s)), poll_s / 2
    tick = 1 if poll_s < 10 else 5 if poll_s < 60 else 10
    return set(range(0, 60, tick)), tick / 2


def is_due(last_polled_at: datetime | None, now: datetime, poll_s: int) -> bool:
    if last_polled_at is None:
        return True
    _, slack = cron_schedule(poll_s)
    return (now - last_polled_at).total_seconds() >= poll_s - slack


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class NewStatement:
    statement_id: int
    title: str
    url: str | None
    action: str = "owed"  # then "held" or "blast <id>"; owed after a failure, done later

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FeedReport:
    """What one poll found in one feed (the body of ``POST /api/feeds/poll``)."""

    url: str
    status: str  # "first run", "ok", "not modified" or "failed"
    error: str | None = None
    entries: int = 0  # entries in the feed as fetched
    new: list[NewStatement] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["new"] = [n.as_dict() for n in self.new]
        return out


@dataclass(frozen=True)
class _FeedRow:
    id: int
    url: str
    etag: str | None
    last_modified: str | None
    last_polled_at: datetime | None
    first_run_done: bool


class PollBusy(Exception):
    """Another poll is running and did not finish in time."""


class Poller:
    """Polls of the site's feeds; ``smtp`` is the worker's pool, or None to open one
    connection for the editors' notice only when there is one to send."""

    def __init__(
        self, runtime: Runtime, queue: Queue, renderer: Renderer, smtp: SmtpPool | None = None
    ) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.actions = Actions(runtime, queue, renderer, smtp)

    async def poll(self, *, only_due: bool = True, wait_s: float = 0.0) -> list[FeedReport]:
        """Poll the feeds (only those due, unless told otherwise). Polls never overlap:
        with ``wait_s`` 0 a poll that finds another running returns [] at once (the cron),
        else it waits that long for it and raises PollBusy (the API)."""
        if not self.settings.feed_urls:
            return []
        lock = self.runtime.redis.lock(
            self.runtime.keys.feed_poll_lock,
            timeout=self.settings.feed_timeout_s * 2 + 120,
            blocking=wait_s > 0,
            blocking_timeout=wait_s or None,
        )
        if not await lock.acquire():
            if wait_s > 0:
                raise PollBusy("another poll of the feeds is still running")
            return []
        try:
            return await self._poll(only_due)
        finally:
            try:
                await lock.release()
            except LockError:  # expired while we ran: the next poll simply starts
                log.warning("feed poll outlived its lock")

    async def _poll(self, only_due: bool) -> list[FeedReport]:
        rows = await self._feed_rows()
        now = utcnow()
        poll_s = self.settings.feed_poll_s
        due = [r for r in rows if not only_due or is_due(r.last_polled_at, now, poll_s)]
        if not due:
            return []
        async with make_client(self.settings) as client:
            results = await asyncio.gather(*(self._fetch(client, row) for row in due))
        reports = []
        for row, result in zip(due, results, strict=True):
            try:
                reports.append(await self._record(row, result))
            except Exception as exc:  # noqa: BLE001 - one feed's trouble stays its own
                log.exception("feed %s: could not record the poll", row.url)
                error = f"internal error: {type(exc).__name__}: {exc}"
                await self._mark(row.id, FeedError(error))
                reports.append(FeedReport(row.url, "failed", error))
        done = await self.actions.settle()
        for new in (n for report in reports for n in report.new):
            new.action = done.get(new.statement_id, new.action)
        return reports

    async def _feed_rows(self) -> list[_FeedRow]:
        """The configured feeds' rows, created on first sight."""
        urls = self.settings.feed_urls
        async with self.runtime.sessions() as session:
            insert = pg_insert if _dialect(session) == "postgresql" else sqlite_insert
            values = [{"url": u, "first_run_done": False, "created_at": utcnow()} for u in urls]
            await session.execute(
                insert(Feed).values(values).on_conflict_do_nothing(index_elements=["url"])
            )
            await session.commit()
            feeds = {
                f.url: f for f in await session.scalars(select(Feed).where(Feed.url.in_(urls)))
            }
            return [
                _FeedRow(f.id, f.url, f.etag, f.last_modified, f.last_polled_at, f.first_run_done)
                for f in (feeds[u] for u in urls)
            ]

    async def _fetch(self, client: Any, row: _FeedRow) -> Fetched | FeedError:
        try:
            return await fetch(
                client,
                row.url,
                etag=row.etag,
                last_modified=row.last_modified,
                timeout_s=self.settings.feed_timeout_s,
                max_bytes=self.settings.feed_max_bytes,
            )
        except FeedError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - a parser's surprise is this feed's error
            return FeedError(f"unreadable: {type(exc).__name__}: {exc}")

    async def _mark(self, feed_id: int, result: Fetched | FeedError) -> None:
        """The feed row after a poll: its validators and its health."""
        now = utcnow()
        values: dict[str, Any] = {"last_polled_at": now}
        if isinstance(result, FeedError):
            values.update(last_error=str(result)[:1000], last_error_at=now)
        else:
            values.update(last_ok_at=now, last_error=None)
            if result.items is not None:
                values.update(
                    etag=result.etag, last_modified=result.last_modified, first_run_done=True
                )
        async with self.runtime.sessions() as session:
            await session.execute(update(Feed).where(Feed.id == feed_id).values(**values))
            await session.commit()

    async def _record(self, row: _FeedRow, result: Fetched | FeedError) -> FeedReport:
        if isinstance(result, FeedError):
            log.warning("feed %s failed: %s", row.url, result)
            await self._mark(row.id, result)
            return FeedReport(row.url, "failed", str(result))
        if result.items is None:
            await self._mark(row.id, result)
            return FeedReport(row.url, "not modified")
        items = result.items
        if not row.first_run_done:
            await self._remember(row.id, items)
            await self._mark(row.id, result)
            log.info("feed %s: first poll, %s entries recorded as seen", row.url, len(items))
            return FeedReport(row.url, "first run", entries=len(items))
        new = await self._new_items(row.id, items)
        report = FeedReport(row.url, "ok", entries=len(items))
        for item in new:
            made = await self._create(row.id, item)
            if made is not None:
                report.new.append(made)
        await self._mark(row.id, result)
        return report

    async def _remember(self, feed_id: int, items: list[FeedItem]) -> None:
        """Record entries as seen without a statement (the backlog, or new keys of entries
        already known by their link)."""
        if not items:
            return
        now = utcnow()
        rows = {
            _sha(item.key): {
                "feed_id": feed_id,
                "key_hash": _sha(item.key),
                "entry_key": item.key,
                "link_hash": _sha(item.link) if item.link else None,
                "link": item.link,
                "title": item.title,
                "seen_at": now,
                "handled_at": now,
            }
            for item in items
        }
        async with self.runtime.sessions() as session:
            insert = pg_insert if _dialect(session) == "postgresql" else sqlite_insert
            stmt = insert(FeedEntry).on_conflict_do_nothing(index_elements=["feed_id", "key_hash"])
            await session.execute(stmt, list(rows.values()))
            await session.commit()

    async def _new_items(self, feed_id: int, items: list[FeedItem]) -> list[FeedItem]:
        async with self.runtime.sessions() as session:
            new, aliases = await split_new(session, feed_id, items)
        await self._remember(feed_id, aliases)
        return new

    async def _create(self, feed_id: int, item: FeedItem) -> NewStatement | None:
        html, text = render_cms_html(item.html, item.link)
        if not text.strip():  # an entry with a title only: the mail points to the page
            where = f'<a href="{escape(item.link)}">' if item.link else "<a>"
            html, text = render_cms_html(f"<p>{where}Read it on the site</a></p>", item.link)
        statement = Statement(
            title=item.title,
            author=item.author,
            url=item.link,
            # Raw HTML is Markdown too: an editor who edits the draft edits this HTML.
            body_markdown="<div>\n"
            + "\n".join(ln for ln in html.splitlines() if ln.strip())
            + "\n</div>\n",
            body_html=html,
            body_text=text,
            source=STATEMENT_FROM_SITE,
        )
        async with self.runtime.sessions() as session:
            session.add(statement)
            await session.flush()
            await session.execute(
                core_insert(FeedEntry).values(
                    feed_id=feed_id,
                    key_hash=_sha(item.key),
                    entry_key=item.key,
                    link_hash=_sha(item.link) if item.link else None,
                    link=item.link,
                    title=item.title,
                    statement_id=statement.id,
                    seen_at=utcnow(),
                )
            )
            try:
                await session.commit()
            except IntegrityError:  # a concurrent poll recorded this entry first
                await session.rollback()
                return None
        log.info("feed entry %r became statement %s", item.title, statement.id)
        return NewStatement(statement.id, item.title, item.link)


async def split_new(
    session: AsyncSession, feed_id: int, items: list[FeedItem]
) -> tuple[list[FeedItem], list[FeedItem]]:
    """(new entries, oldest first; entries known by their link under a new key). Reads
    only, so ``mailer feeds check`` can use it too."""
    keys = {_sha(i.key) for i in items}
    links = {_sha(i.link) for i in items if i.link}
    known_keys = set(
        await session.scalars(
            select(FeedEntry.key_hash).where(
                FeedEntry.feed_id == feed_id, FeedEntry.key_hash.in_(keys)
            )
        )
    )
    known_links = set(
        await session.scalars(
            select(FeedEntry.link_hash).where(
                FeedEntry.feed_id == feed_id, FeedEntry.link_hash.in_(links)
            )
        )
    )
    new: dict[str, FeedItem] = {}
    aliases = []
    for item in items:
        key = _sha(item.key)
        if key in known_keys or key in new:
            continue
        if item.link and _sha(item.link) in known_links:
            aliases.append(item)  # a changed guid: known by its link, so not new
            continue
        new[key] = item
    ordered = list(new.values())
    if ordered and all(i.published is not None for i in ordered):
        return sorted(ordered, key=lambda i: i.published or 0.0), aliases
    return ordered[::-1], aliases  # feeds list their newest first


def _dialect(session: AsyncSession) -> str:
    return session.get_bind().dialect.name
