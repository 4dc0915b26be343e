"""The compose page of one statement, shared by the pages that edit, test and blast it.

The app's CSP forbids inline scripts and styles, so behaviour lives in
``static/admin.js`` and email previews, whose HTML carries inline styles, are
served from their own endpoints with a sandboxing CSP (``PREVIEW_HEADERS``) and
shown in a ``sandbox`` iframe.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from mailer import blasts, statements
from mailer.db import utcnow
from mailer.models import Blast, BlastStatus, Statement, Subscriber, SubscriberStatus
from mailer.web.admin.session import AdminSession, Flash, Posted, render
from mailer.web.context import get_ctx

PREVIEW_HEADERS = {
    "Content-Security-Policy": "sandbox; default-src 'none'; style-src 'unsafe-inline'; "
    "img-src data: https:; frame-ancestors 'self'",
    "X-Frame-Options": "SAMEORIGIN",
    "Cache-Control": "no-store",
}


async def lock_reason(session: AsyncSession, statement_id: int) -> str | None:
    """Why a statement can no longer change, or None while it is still a draft.

    Once a blast is scheduled or under way the workers send the saved text, and once
    one finished some subscribers hold that text; editing would make the record lie.
    """
    rows = await session.execute(
        select(Blast.id, Blast.status, Blast.started_at)
        .where(Blast.statement_id == statement_id)
        .order_by(Blast.id.desc())
    )
    for blast_id, status, started_at in rows:
        if status in blasts.ACTIVE:
            return (
                f"This statement can't be edited: blast #{blast_id} is {status}. "
                "Cancel that blast first if the text must change."
            )
        if status == BlastStatus.done or started_at is not None:
            return (
                f"This statement can't be edited: blast #{blast_id} already sent it "
                f"({status}). Write a new statement instead."
            )
    return None


def form_statement(posted: Posted) -> dict[str, str]:
    return {
        name: posted.text(name).replace("\r\n", "\n")
        for name in ("title", "author", "url", "body_markdown")
    }


def compose_page(
    request: Request,
    admin: AdminSession,
    *,
    statement: Statement | None,
    values: dict[str, str],
    status: int = 200,
    flash: Flash | None = None,
    extra: dict[str, Any] | None = None,
) -> HTMLResponse:
    return render(
        request,
        "statement.html",
        admin,
        status,
        flash,
        section="statements",
        statement=statement,
        values=values,
        draft_id=secrets.token_urlsafe(12),
        **(extra or {}),
    )


async def show_statement(
    request: Request,
    admin: AdminSession,
    statement_id: int,
    status: int = 200,
    flash: Flash | None = None,
    values: dict[str, str] | None = None,
) -> HTMLResponse:
    ctx = get_ctx(request)
    async with ctx.runtime.sessions() as session:
        statement = await statements.get_statement(session, statement_id)
        if statement is None:
            return render(
                request,
                "error.html",
                admin,
                404,
                heading="No such statement",
                message=f"There is no statement #{statement_id}.",
            )
        locked = await lock_reason(session, statement_id)
        own_blasts = await session.execute(
            select(Blast.id, Blast.status, Blast.send_at, Blast.created_at)
            .where(Blast.statement_id == statement_id)
            .order_by(Blast.id.desc())
        )
        audience = await session.scalar(
            select(func.count())
            .select_from(Subscriber)
            .where(Subscriber.status == SubscriberStatus.confirmed)
        )
    current = values or {
        "title": statement.title,
        "author": statement.author or "",
        "url": statement.url or "",
        "body_markdown": statement.body_markdown,
    }
    now = utcnow()
    return compose_page(
        request,
        admin,
        statement=statement,
        values=current,
        status=status,
        flash=flash,
        extra={
            "locked": locked,
            "blasts": list(own_blasts),
            "audience": int(audience or 0),
            "now_utc": now.strftime("%Y-%m-%d %H:%M"),
            "min_send_at": now.strftime("%Y-%m-%dT%H:%M"),
        },
    )
