"""Blasts: the list with progress bars, one blast with its failures, pause/resume/cancel."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from mailer import blasts
from mailer.bounces import stats as bounce_stats
from mailer.errors import MailerError
from mailer.models import BlastStatus, Delivery, DeliveryStatus, Statement, Subscriber
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
from mailer.web.deps import BlastId, status_for

TERMINAL = (BlastStatus.done, BlastStatus.cancelled)
DONE = {"pause": "paused", "resume": "resumed", "cancel": "cancelled; nothing more will be sent"}

router = admin_router()


def _percent(p: blasts.Progress) -> int:
    """Floor, so 100 % means every recipient is finished, never "almost"."""
    if p.status == BlastStatus.done:
        return 100
    if p.total <= 0:
        return 0
    return min(100, (p.sent + p.failed + p.skipped) * 100 // p.total)


def _progress_json(p: blasts.Progress) -> dict[str, Any]:
    return p.as_dict() | {"percent": _percent(p), "final": p.status in TERMINAL}


async def _titles(session: AsyncSession, ids: list[int]) -> dict[int, str]:
    if not ids:
        return {}
    rows = await session.execute(select(Statement.id, Statement.title).where(Statement.id.in_(ids)))
    return {i: t for i, t in rows}


async def _blasts_page(
    request: Request, admin: AdminSession, status: int = 200, flash: Flash | None = None
) -> HTMLResponse:
    async with get_ctx(request).runtime.sessions() as session:
        items = await blasts.list_blasts(session, limit=100)
        titles = await _titles(session, list({p.statement_id for p in items}))
    rows = [{"p": p, "percent": _percent(p), "title": titles.get(p.statement_id)} for p in items]
    return render(request, "blasts.html", admin, status, flash, section="blasts", rows=rows)


@router.get("/blasts", response_class=HTMLResponse)
async def blasts_page(request: Request, admin: Signed) -> Response:
    return await _blasts_page(request, admin)


@router.get("/blasts/{blast_id}/progress.json")
async def blast_progress(request: Request, blast_id: BlastId, _: Signed) -> JSONResponse:
    async with get_ctx(request).runtime.sessions() as session:
        p = await blasts.progress(session, blast_id)
    if p is None:
        return JSONResponse({"detail": f"no blast with id {blast_id}"}, 404)
    return JSONResponse(_progress_json(p))


@router.get("/blasts/{blast_id}", response_class=HTMLResponse)
async def blast_page(request: Request, blast_id: BlastId, admin: Signed) -> Response:
    """Failures are listed with the relay's own reply: only the code and text tell an editor
    whether an address, the content or the sender's reputation is at fault."""
    async with get_ctx(request).runtime.sessions() as session:
        p = await blasts.progress(session, blast_id)
        if p is None:
            return render(
                request,
                "error.html",
                admin,
                404,
                heading="No such blast",
                message=f"There is no blast #{blast_id}.",
            )
        titles = await _titles(session, [p.statement_id])
        bounced = await bounce_stats.for_blast(session, blast_id)
        rows = await session.execute(
            select(Delivery, Subscriber.email)
            .outerjoin(Subscriber, Subscriber.id == Delivery.subscriber_id)
            .where(
                Delivery.blast_id == blast_id,
                or_(
                    Delivery.status == DeliveryStatus.failed,
                    Delivery.last_code.is_not(None),
                    Delivery.last_error.is_not(None),
                ),
            )
            .order_by(Delivery.id)
            .limit(500)
        )
        problems = [{"d": d, "email": email} for d, email in rows]
    return render(
        request,
        "blast.html",
        admin,
        section="blasts",
        p=p,
        percent=_percent(p),
        title=titles.get(p.statement_id),
        problems=problems,
        bounces=bounced,
        limits=get_ctx(request).runtime.settings,
    )


@router.post("/blasts/{blast_id}/{action}", response_class=HTMLResponse)
async def blast_action(request: Request, blast_id: BlastId, action: str, posted: Post) -> Response:
    ctx = get_ctx(request)
    try:
        await blasts.apply_action(ctx.runtime, ctx.queue, blast_id, action)
    except blasts.UnknownAction:
        return render(
            request,
            "error.html",
            posted.admin,
            404,
            heading="Unknown action",
            message="A blast can be paused, resumed or cancelled.",
        )
    except MailerError as exc:
        return await _blasts_page(request, posted.admin, status_for(exc), Flash("error", str(exc)))
    return redirect(request, "/admin/blasts", f"Blast #{blast_id} {DONE[action]}.")
