"""The campaign site in the admin: the form to paste into it, and the statements it sent us.

- ``/admin/site``, "Form for your site": the copy-paste snippet of
  ``mailer/web/site_form.py`` (a plain form that works without JavaScript, optionally
  with ``/embed.js``), which origins may post it (``MAILER_ALLOWED_ORIGINS``) and
  whether the site's feeds are being read.
- ``/admin/from-site``, "From the site": statements the feed poller made that no blast
  has sent yet (``MAILER_FEED_MODE=hold`` leaves them there), each with a one-click
  "Send to all subscribers" that goes through ``blasts.create`` like every other blast,
  and "Poll feeds now" for when an editor knows the site has just published.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import func, select

from mailer import blasts
from mailer.errors import MailerError
from mailer.feed_actions import is_from_site, site_drafts
from mailer.feed_status import FeedHealth, feed_health
from mailer.feeds import FeedReport, PollBusy, Poller
from mailer.models import Blast, Statement, Subscriber, SubscriberStatus
from mailer.web.admin.session import (
    AdminSession,
    Flash,
    Post,
    Signed,
    admin_router,
    redirect,
    render,
)
from mailer.web.context import get_ctx
from mailer.web.cors import site_origins
from mailer.web.deps import StatementId, status_for
from mailer.web.snippet import SnippetError, form_snippet

MAX_SOURCE = 200
MAX_REDIRECT = 2000

router = admin_router()


async def _feeds(request: Request) -> list[FeedHealth]:
    ctx = get_ctx(request)
    async with ctx.runtime.sessions() as session:
        return await feed_health(session, ctx.runtime.settings.feed_urls)


@router.get("/site", response_class=HTMLResponse)
async def site_form_page(
    request: Request,
    admin: Signed,
    source: str = "",
    redirect_to: Annotated[str, Query(alias="redirect")] = "",
    script: str = "yes",
) -> Response:
    """The snippet, made to the editor's options (a GET form on the page: no JavaScript)."""
    settings = get_ctx(request).runtime.settings
    source, redirect_to = source.strip()[:MAX_SOURCE], redirect_to.strip()[:MAX_REDIRECT]
    with_script = script != "no"
    status, flash = 200, None
    try:
        snippet = form_snippet(
            settings, source=source, redirect=redirect_to or None, script=with_script
        )
    except SnippetError as exc:
        status, flash = 422, Flash("error", f"Not used: {exc}")
        snippet = form_snippet(settings, source=source, script=with_script)
    return render(
        request,
        "site.html",
        admin,
        status,
        flash,
        section="site",
        snippet=snippet,
        source=source,
        redirect_to=redirect_to,
        with_script=with_script,
        origins=list(settings.allowed_origins),
        own_origin=sorted(site_origins(settings) - set(settings.allowed_origins)),
        feeds=await _feeds(request),
        settings=settings,
    )


async def _from_site_page(
    request: Request, admin: AdminSession, status: int = 200, flash: Flash | None = None
) -> HTMLResponse:
    ctx = get_ctx(request)
    async with ctx.runtime.sessions() as session:
        drafts = await site_drafts(session)
        confirmed = await session.scalar(
            select(func.count())
            .select_from(Subscriber)
            .where(Subscriber.status == SubscriberStatus.confirmed)
        )
        feeds = await feed_health(session, ctx.runtime.settings.feed_urls)
    return render(
        request,
        "from_site.html",
        admin,
        status,
        flash,
        section="from-site",
        drafts=drafts,
        confirmed=int(confirmed or 0),
        feeds=feeds,
        settings=ctx.runtime.settings,
    )


@router.get("/from-site", response_class=HTMLResponse)
async def from_site_page(request: Request, admin: Signed) -> Response:
    return await _from_site_page(request, admin)


@router.post("/from-site/{statement_id}/send", response_class=HTMLResponse)
async def send_from_site(request: Request, statement_id: StatementId, posted: Post) -> Response:
    """One click: a blast of the statement to every confirmed subscriber, now. A statement
    that a blast already sent is not sent again from here (a second click, a stale page)."""
    ctx = get_ctx(request)
    async with ctx.runtime.sessions() as session:
        statement = await session.get(Statement, statement_id)
        earlier = await session.scalar(
            select(Blast.id).where(Blast.statement_id == statement_id).order_by(Blast.id).limit(1)
        )
    if statement is None or not is_from_site(statement):
        return await _from_site_page(
            request,
            posted.admin,
            404,
            Flash("error", f"Statement #{statement_id} is not a statement from the site."),
        )
    if earlier is not None:
        return redirect(
            request,
            f"/admin/blasts/{earlier}",
            f"Not sent again: “{statement.title}” already went out in blast #{earlier}.",
            "error",
        )
    try:
        blast = await blasts.create(
            ctx.runtime, ctx.queue, statement_id, None, posted.admin.editor_id
        )
    except MailerError as exc:
        return await _from_site_page(
            request, posted.admin, status_for(exc), Flash("error", f"Not sent: {exc}")
        )
    return redirect(
        request,
        f"/admin/blasts/{blast.id}",
        f"Blast #{blast.id} started: “{statement.title}” is going to every confirmed subscriber.",
    )


def _report_line(report: FeedReport) -> str:
    line = f"{report.url}: {report.status}"
    if report.error:
        line += f" ({report.error})"
    if report.new:
        titles = ", ".join(f"“{n.title}” ({n.action})" for n in report.new)
        line += f"; {len(report.new)} new: {titles}"
    elif report.status in ("ok", "not modified"):
        line += "; nothing new"
    return line


@router.post("/from-site/poll", response_class=HTMLResponse)
async def poll_now(request: Request, posted: Post) -> Response:
    """Poll every feed now, due or not; the answer says what each one held that was new."""
    ctx = get_ctx(request)
    settings = ctx.runtime.settings
    if not settings.feed_urls:
        return await _from_site_page(
            request,
            posted.admin,
            409,
            Flash("error", "No feed to poll: set MAILER_FEED_URLS to the site's feed."),
        )
    poller = Poller(ctx.runtime, ctx.queue, ctx.renderer)
    try:
        # An editor is waiting on the page: a poll already running (the cron's) gets as
        # long as one fetch may take, then the answer is "try again" rather than a hang.
        reports = await poller.poll(only_due=False, wait_s=settings.feed_timeout_s)
    except PollBusy as exc:
        return await _from_site_page(
            request, posted.admin, 409, Flash("error", f"Not polled: {exc}. Try again shortly.")
        )
    failed = any(r.status == "failed" for r in reports)
    text = "Polled. " + " · ".join(_report_line(r) for r in reports)
    return redirect(request, "/admin/from-site", text, "error" if failed else "ok")
