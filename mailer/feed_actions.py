"""What happens to a statement that came from the site: held for editors, or blasted.

``MAILER_FEED_MODE=hold`` leaves it a draft and mails every editor who has an address
("New statement on the site: review and send", linking to its admin page);
``blast`` starts a blast through ``blasts.create``, the path an editor's blast takes, so
rate limits, send-time re-checks and crash recovery all apply. More than
``MAX_BLASTS_AT_ONCE`` statements owed at once are held even in blast mode: that looks
like a feed that changed its ids, not like news (docs/feeds.md).

The action is owed while the entry's ``handled_at`` is NULL and done at most once per
statement: a statement that already has a blast never gets another.
"""

from __future__ import annotations

import logging

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from mailer import blasts
from mailer.config import FeedMode
from mailer.db import utcnow
from mailer.errors import MailerError
from mailer.models import STATEMENT_FROM_SITE, Blast, Editor, FeedEntry, Statement
from mailer.queue import Queue
from mailer.render import Renderer
from mailer.runtime import Runtime
from mailer.smtp import SendError, SmtpConfigError, SmtpPool, TransientSendError

log = logging.getLogger("mailer.feeds")

MAX_BLASTS_AT_ONCE = 3
NOTICE_SUBJECT = "New statement on the site: review and send"
HOLD_WHY = (
    "It waits as a draft: nothing has been sent to subscribers. "
    "Review it, then send it with one click."
)


class Actions:
    """``smtp`` is the worker's pool, or None to open one connection only when a notice
    is to be sent (the web process)."""

    def __init__(
        self, runtime: Runtime, queue: Queue, renderer: Renderer, smtp: SmtpPool | None = None
    ) -> None:
        self.runtime = runtime
        self.queue = queue
        self.renderer = renderer
        self.smtp = smtp
        self.settings = runtime.settings

    async def settle(self) -> dict[int, str]:
        """Do what is owed for every statement from the site; returns statement id →
        what was done ("held", "blast <id>")."""
        async with self.runtime.sessions() as session:
            rows = await session.execute(
                select(FeedEntry.id, Statement)
                .join(Statement, Statement.id == FeedEntry.statement_id)
                .where(FeedEntry.handled_at.is_(None))
                .order_by(FeedEntry.id)
            )
            owed: list[tuple[int, Statement]] = [(row[0], row[1]) for row in rows]
        done: dict[int, str] = {}
        if not owed:
            return done
        if self.settings.feed_mode is FeedMode.blast and len(owed) <= MAX_BLASTS_AT_ONCE:
            for entry_id, statement in owed:
                try:
                    done[statement.id] = await self._blast(statement.id)
                except Exception:  # noqa: BLE001 - owed still: the next poll tries again
                    log.exception("statement %s from the site: blast not started", statement.id)
                    continue
                await self._handled([entry_id])
            return done
        why = HOLD_WHY
        if self.settings.feed_mode is FeedMode.blast:
            why = (
                f"MAILER_FEED_MODE is blast, but {len(owed)} new statements appeared at once "
                f"(more than {MAX_BLASTS_AT_ONCE}), so none was sent automatically: check that "
                "the site's feed did not change its entry ids. " + HOLD_WHY
            )
        if await self._notify([s for _, s in owed], why):
            await self._handled([entry_id for entry_id, _ in owed])
            done.update((s.id, "held") for _, s in owed)
        return done

    async def _blast(self, statement_id: int) -> str:
        async with self.runtime.sessions() as session:
            existing = await session.scalar(
                select(Blast.id).where(Blast.statement_id == statement_id).limit(1)
            )
        if existing is not None:
            return f"blast {existing}"
        try:
            blast = await blasts.create(self.runtime, self.queue, statement_id, None, None)
        except MailerError as exc:
            log.warning("statement %s from the site: %s", statement_id, exc.message)
            return f"not sent: {exc.message}"
        return f"blast {blast.id}"

    async def _handled(self, entry_ids: list[int]) -> None:
        async with self.runtime.sessions() as session:
            await session.execute(
                update(FeedEntry).where(FeedEntry.id.in_(entry_ids)).values(handled_at=utcnow())
            )
            await session.commit()

    async def _notify(self, statements: list[Statement], why: str) -> bool:
        """Tell every editor with an address; False when a transient failure means the
        notice is owed still (editors already told may then hear of it twice)."""
        async with self.runtime.sessions() as session:
            editors = [
                e
                for e in await session.scalars(
                    select(Editor.email).where(
                        Editor.email.is_not(None), Editor.disabled.is_(False)
                    )
                )
                if e
            ]
        if not editors:
            log.warning(
                "%s statement(s) from the site wait as drafts; no editor has an email address "
                "to be told (mailer editors add NAME --email ADDRESS)",
                len(statements),
            )
            return True
        base = self.settings.base_url
        context = {
            "why": why,
            "statements": [
                {
                    "title": s.title,
                    "author": s.author,
                    "url": s.url,
                    "admin_url": f"{base}/admin/statements/{s.id}",
                }
                for s in statements
            ],
        }
        n = len(statements)
        subject = NOTICE_SUBJECT if n == 1 else f"{n} new statements on the site: review and send"
        smtp = self.smtp or SmtpPool(self.settings, size=1)
        complete = True
        try:
            for to in editors:
                data = self.renderer.notice(
                    to=to, subject=subject, template="site_statements", context=context
                )
                try:
                    await smtp.send(self.settings.from_address, to, data)
                except (TransientSendError, SmtpConfigError) as exc:
                    log.warning("notice to editor %s deferred: %s", to, exc)
                    complete = False
                except SendError as exc:
                    log.error("notice to editor %s refused: %s", to, exc)
        finally:
            if self.smtp is None:
                await smtp.close()
        return complete


async def site_drafts(session: AsyncSession, limit: int = 50) -> list[Statement]:
    """Statements from the site that no blast has sent yet, newest first: the admin UI's
    "from the site" list. Sending one is ``blasts.create`` like any statement."""
    query = (
        select(Statement)
        .where(
            Statement.source == STATEMENT_FROM_SITE,
            Statement.id.not_in(select(Blast.statement_id)),
        )
        .order_by(Statement.id.desc())
        .limit(limit)
    )
    return list(await session.scalars(query))


def is_from_site(statement: Statement) -> bool:
    return statement.source == STATEMENT_FROM_SITE
