"""The statements: list, compose a new one, edit a draft, preview a saved one."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mailer import statements
from mailer.errors import one_line
from mailer.feed_actions import is_from_site
from mailer.models import Blast, Statement
from mailer.render import StatementContent
from mailer.web.admin.compose import (
    PREVIEW_HEADERS,
    compose_page,
    form_statement,
    lock_reason,
    show_statement,
)
from mailer.web.admin.session import Flash, Post, Signed, admin_router, redirect, render
from mailer.web.context import get_ctx
from mailer.web.deps import StatementId

router = admin_router()


async def _statement_rows(session: AsyncSession) -> list[dict[str, Any]]:
    items = await statements.list_statements(session, limit=200)
    latest: dict[int, tuple[int, str]] = {}
    if items:
        rows = await session.execute(
            select(Blast.statement_id, Blast.id, Blast.status)
            .where(Blast.statement_id.in_([s.id for s in items]))
            .order_by(Blast.id)
        )
        for statement_id, blast_id, status in rows:
            latest[statement_id] = (blast_id, status)
    return [{"s": s, "blast": latest.get(s.id), "from_site": is_from_site(s)} for s in items]


@router.get("/statements", response_class=HTMLResponse)
async def statements_page(request: Request, admin: Signed) -> Response:
    async with get_ctx(request).runtime.sessions() as session:
        rows = await _statement_rows(session)
    return render(request, "statements.html", admin, section="statements", rows=rows)


@router.get("/statements/new", response_class=HTMLResponse)
async def new_statement(request: Request, admin: Signed) -> Response:
    return compose_page(request, admin, statement=None, values={})


@router.post("/statements", response_class=HTMLResponse)
async def create_statement(request: Request, posted: Post) -> Response:
    values = form_statement(posted)
    try:
        data = statements.StatementIn(**values)
    except ValidationError as exc:
        return compose_page(
            request,
            posted.admin,
            statement=None,
            values=values,
            status=422,
            flash=Flash("error", f"Not saved: {one_line(exc, repeat_field=False)}"),
        )
    async with get_ctx(request).runtime.sessions() as session:
        statement = await statements.create_statement(session, data, posted.admin.editor_id)
    return redirect(request, f"/admin/statements/{statement.id}", f"Saved draft #{statement.id}.")


@router.get("/statements/{statement_id}", response_class=HTMLResponse)
async def statement_page(request: Request, statement_id: StatementId, admin: Signed) -> Response:
    return await show_statement(request, admin, statement_id)


@router.post("/statements/{statement_id}", response_class=HTMLResponse)
async def update_statement(request: Request, statement_id: StatementId, posted: Post) -> Response:
    values = form_statement(posted)
    try:
        data = statements.StatementIn(**values)
    except ValidationError as exc:
        return await show_statement(
            request,
            posted.admin,
            statement_id,
            422,
            Flash("error", f"Not saved: {one_line(exc, repeat_field=False)}"),
            values,
        )
    async with get_ctx(request).runtime.sessions() as session:
        # Row lock first: a blast insert (its foreign key) waits for this transaction, and
        # one committed before it is seen by the check below.
        if await session.get(Statement, statement_id, with_for_update=True) is None:
            await session.rollback()
            return await show_statement(request, posted.admin, statement_id)
        locked = await lock_reason(session, statement_id)
        if locked is None:
            await statements.update_statement(session, statement_id, data, posted.admin.editor_id)
        else:
            await session.rollback()
    if locked is not None:
        return await show_statement(
            request, posted.admin, statement_id, 409, Flash("error", f"Not saved. {locked}")
        )
    return redirect(request, f"/admin/statements/{statement_id}", "Saved.")


@router.get("/statements/{statement_id}/preview")
async def statement_preview(request: Request, statement_id: StatementId, _: Signed) -> Response:
    ctx = get_ctx(request)
    async with ctx.runtime.sessions() as session:
        statement = await statements.get_statement(session, statement_id)
    if statement is None:
        return HTMLResponse("no such statement", 404, headers=PREVIEW_HEADERS)
    html = ctx.renderer.preview_html(StatementContent.from_model(statement))
    return HTMLResponse(html, headers=PREVIEW_HEADERS)
