"""The editor API: statements, test sends, blasts and subscribers, behind bearer tokens."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select

from mailer import blasts, statements
from mailer.errors import MailerError
from mailer.models import Subscriber, SubscriberEvent, SubscriberStatus
from mailer.render import StatementContent
from mailer.smtp import SmtpConfigError
from mailer.subscriptions import InvalidInput, has_control, normalize_email, search
from mailer.web.context import MAX_SQL_INT, AppContext, get_ctx
from mailer.web.deps import (
    EDITOR_ERRORS,
    NOT_FOUND,
    ApiError,
    BlastId,
    EditorDep,
    EditorRoute,
    Offset,
    StatementId,
    SubscriberId,
    problem,
    send_test_copies,
    status_for,
)
from mailer.web.guards import SANDBOX_HEADERS

router = APIRouter(prefix="/api", responses=EDITOR_ERRORS, route_class=EditorRoute)


def _statement_json(s: Any) -> dict[str, Any]:
    return {
        "id": s.id,
        "title": s.title,
        "author": s.author,
        "url": s.url,
        "body_markdown": s.body_markdown,
        "body_html": s.body_html,
        "body_text": s.body_text,
        "editor_id": s.editor_id,
        "source": s.source,
        "created_at": s.created_at.isoformat(),
        "updated_at": s.updated_at.isoformat(),
    }


@router.post("/statements", status_code=201)
async def create_statement(
    request: Request, data: statements.StatementIn, editor: EditorDep
) -> JSONResponse:
    ctx = get_ctx(request)
    async with ctx.runtime.sessions() as session:
        statement = await statements.create_statement(session, data, editor.id)
    return JSONResponse(_statement_json(statement), 201)


async def _statement_or_404(ctx: AppContext, statement_id: int) -> Any:
    async with ctx.runtime.sessions() as session:
        statement = await statements.get_statement(session, statement_id)
    if statement is None:
        raise ApiError(404, f"no statement with id {statement_id}")
    return statement


@router.get("/statements/{statement_id}", responses=NOT_FOUND)
async def get_statement(
    request: Request, statement_id: StatementId, _: EditorDep
) -> dict[str, Any]:
    return _statement_json(await _statement_or_404(get_ctx(request), statement_id))


@router.get("/statements/{statement_id}/preview", response_class=HTMLResponse, responses=NOT_FOUND)
async def preview(request: Request, statement_id: StatementId, _: EditorDep) -> HTMLResponse:
    ctx = get_ctx(request)
    statement = await _statement_or_404(ctx, statement_id)
    html = ctx.renderer.preview_html(StatementContent.from_model(statement))
    # Mail HTML, sandboxed as in the admin UI: opened directly it must run nothing.
    return HTMLResponse(html, headers=SANDBOX_HEADERS)


class TestSendIn(BaseModel):
    to: list[str] = Field(min_length=1, max_length=20)


@router.post(
    "/statements/{statement_id}/test",
    responses=NOT_FOUND | {502: problem("the SMTP relay is unusable (configuration, TLS, login)")},
)
async def send_test(
    request: Request, statement_id: StatementId, data: TestSendIn, _: EditorDep
) -> dict[str, Any]:
    ctx = get_ctx(request)
    try:
        recipients = [normalize_email(a) for a in data.to]
    except InvalidInput as exc:
        raise ApiError(422, f"to: {exc.message}") from None
    statement = await _statement_or_404(ctx, statement_id)
    try:
        results = await send_test_copies(ctx, statement, recipients)
    except SmtpConfigError as exc:
        raise ApiError(502, f"SMTP relay unusable: {exc}") from None
    return {"statement_id": statement_id, "results": results}


class BlastIn(BaseModel):
    statement_id: int = Field(ge=1, le=MAX_SQL_INT)
    send_at: datetime | None = None

    @field_validator("send_at")
    @classmethod
    def _in_range(cls, value: datetime | None) -> datetime | None:
        """An offset that pushes the instant past year 9999 (or before year 1) in UTC."""
        if value is not None and value.tzinfo is not None:
            try:
                value.astimezone(UTC)
            except OverflowError:
                raise ValueError("is out of range once converted to UTC") from None
        return value


@router.post("/blasts", status_code=202, responses={409: problem("the statement is being sent")})
async def create_blast(request: Request, data: BlastIn, editor: EditorDep) -> JSONResponse:
    ctx = get_ctx(request)
    try:
        blast = await blasts.create(
            ctx.runtime, ctx.queue, data.statement_id, data.send_at, editor.id
        )
    except MailerError as exc:
        raise ApiError(status_for(exc), str(exc)) from None
    return JSONResponse(await _blast_json(ctx, blast.id), 202)


async def _blast_json(ctx: AppContext, blast_id: int) -> dict[str, Any]:
    async with ctx.runtime.sessions() as session:
        progress = await blasts.progress(session, blast_id)
    if progress is None:
        raise ApiError(404, f"no blast with id {blast_id}")
    return progress.as_dict()


@router.get("/blasts")
async def list_blasts(
    request: Request,
    _: EditorDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Offset = 0,
) -> dict[str, Any]:
    ctx = get_ctx(request)
    async with ctx.runtime.sessions() as session:
        items = await blasts.list_blasts(session, limit, offset)
    return {"items": [p.as_dict() for p in items]}


@router.get("/blasts/{blast_id}", responses=NOT_FOUND)
async def get_blast(request: Request, blast_id: BlastId, _: EditorDep) -> dict[str, Any]:
    """The blast's progress, and its bounces and complaints with their rates."""
    from mailer.bounces import stats as bounce_stats

    ctx = get_ctx(request)
    out = await _blast_json(ctx, blast_id)
    async with ctx.runtime.sessions() as session:
        bounces = (await bounce_stats.for_blast(session, blast_id)).as_dict()
    out["bounces"] = {k: v for k, v in bounces.items() if k != "blast_id"}
    return out


@router.post(
    "/blasts/{blast_id}/{action}",
    responses=NOT_FOUND | {409: problem("the blast's state forbids the action")},
)
async def blast_action(
    request: Request, blast_id: BlastId, action: str, _: EditorDep
) -> JSONResponse:
    ctx = get_ctx(request)
    try:
        await blasts.apply_action(ctx.runtime, ctx.queue, blast_id, action)
    except MailerError as exc:
        raise ApiError(status_for(exc), str(exc)) from None
    return JSONResponse(await _blast_json(ctx, blast_id))


def _subscriber_json(s: Subscriber) -> dict[str, Any]:
    return {
        "id": s.id,
        "email": s.email,
        "name": s.name,
        "status": s.status,
        "created_at": s.created_at.isoformat(),
        "confirmed_at": s.confirmed_at.isoformat() if s.confirmed_at else None,
        "unsubscribed_at": s.unsubscribed_at.isoformat() if s.unsubscribed_at else None,
        "consent": {
            "at": s.consent_at.isoformat() if s.consent_at else None,
            "ip": s.consent_ip,
            "user_agent": s.consent_user_agent,
            "source": s.consent_source,
        },
    }


@router.get("/subscribers")
async def list_subscribers(
    request: Request,
    _: EditorDep,
    status: SubscriberStatus | None = None,
    q: Annotated[str | None, Query(max_length=320)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
) -> dict[str, Any]:
    ctx = get_ctx(request)
    if q and has_control(q):  # PostgreSQL cannot even compare text with a NUL in it
        raise ApiError(422, "query.q: must not contain control characters")
    async with ctx.runtime.sessions() as session:
        total, rows = await search(
            session, status=status, contains=(q or "").lower(), limit=limit, offset=offset
        )
        items = [_subscriber_json(s) for s in rows]
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@router.get("/subscribers/{subscriber_id}", responses=NOT_FOUND)
async def get_subscriber(
    request: Request, subscriber_id: SubscriberId, _: EditorDep
) -> dict[str, Any]:
    ctx = get_ctx(request)
    async with ctx.runtime.sessions() as session:
        sub = await session.get(Subscriber, subscriber_id)
        if sub is None:
            raise ApiError(404, f"no subscriber with id {subscriber_id}")
        events = await session.scalars(
            select(SubscriberEvent)
            .where(SubscriberEvent.subscriber_id == subscriber_id)
            .order_by(SubscriberEvent.id)
        )
        out = _subscriber_json(sub)
        out["events"] = [
            {"kind": e.kind, "at": e.at.isoformat(), "ip": e.ip, "detail": e.detail} for e in events
        ]
    return out


@router.get("/subscribers/{subscriber_id}/export", responses=NOT_FOUND)
async def export_subscriber_data(
    request: Request, subscriber_id: SubscriberId, _: EditorDep
) -> dict[str, Any]:
    """Everything held on one person, for a data-subject access request."""
    from mailer.privacy import export_subscriber

    async with get_ctx(request).runtime.sessions() as session:
        data = await export_subscriber(session, subscriber_id)
    if data is None:
        raise ApiError(404, f"no subscriber with id {subscriber_id}")
    return data


@router.delete("/subscribers/{subscriber_id}", status_code=204, responses=NOT_FOUND)
async def erase_subscriber_data(
    request: Request, subscriber_id: SubscriberId, editor: EditorDep
) -> None:
    """Erase (GDPR): personal data gone, the address hashed onto the suppression list."""
    import logging

    from mailer.privacy import erase_subscriber

    ctx = get_ctx(request)
    async with ctx.runtime.sessions() as session:
        erased = await erase_subscriber(session, ctx.runtime.settings, subscriber_id)
    if not erased:
        raise ApiError(404, f"no subscriber with id {subscriber_id}")
    logging.getLogger("mailer.privacy").info(
        "subscriber %s erased by editor %s", subscriber_id, editor.id
    )


@router.post(
    "/feeds/poll",
    responses={409: problem("no feed is configured, or another poll is still running")},
)
async def poll_feeds(request: Request, _: EditorDep) -> dict[str, Any]:
    """Poll the site's feeds now (a CMS "on publish" hook): what each feed held that was new."""
    from mailer.feeds import PollBusy, Poller

    ctx = get_ctx(request)
    settings = ctx.runtime.settings
    if not settings.feed_urls:
        raise ApiError(409, "no feed is configured (MAILER_FEED_URLS)")
    poller = Poller(ctx.runtime, ctx.queue, ctx.renderer)
    try:
        reports = await poller.poll(only_due=False, wait_s=settings.feed_timeout_s + 30)
    except PollBusy as exc:
        raise ApiError(409, str(exc)) from None
    return {"feeds": [r.as_dict() for r in reports]}
