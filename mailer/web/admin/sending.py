"""From a statement to mail: live preview of a draft, test copies, a blast now or later."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from mailer import blasts, statements
from mailer.db import utcnow
from mailer.errors import MailerError
from mailer.models import BlastStatus
from mailer.render import StatementContent
from mailer.smtp import SmtpConfigError
from mailer.subscriptions import InvalidInput, normalize_email
from mailer.web.admin.compose import PREVIEW_HEADERS, form_statement, show_statement
from mailer.web.admin.session import Flash, Post, Posted, Signed, admin_router, redirect
from mailer.web.context import AppContext, get_ctx
from mailer.web.deps import StatementId, send_test_copies, status_for

PREVIEW_TTL_S = 1800
MAX_TEST_RECIPIENTS = 20
PAST_GRACE = timedelta(minutes=5)
_DRAFT_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")

router = admin_router()


def _preview_key(ctx: AppContext, editor_id: int, draft_id: str) -> str:
    return ctx.runtime.keys.admin_preview(editor_id, draft_id)


@router.post("/preview")
async def preview_draft(request: Request, posted: Post) -> JSONResponse:
    """Render an unsaved draft as the email; the iframe then loads it by URL.

    The frame needs its own document (and its own CSP) for the email's inline
    styles, so the HTML waits briefly in Redis, one key per open compose page.
    """
    ctx = get_ctx(request)
    draft_id = posted.text("draft_id")
    if not _DRAFT_ID.fullmatch(draft_id):
        return JSONResponse({"detail": "draft_id: missing or malformed"}, 422)
    values = form_statement(posted)
    body = values["body_markdown"]
    if len(body) > statements.MAX_BODY:
        return JSONResponse(
            {"detail": f"body_markdown must be at most {statements.MAX_BODY} characters"}, 422
        )
    html, text = statements.render_markdown(body.replace("\x00", ""))
    content = StatementContent(
        title=" ".join(values["title"].split())[: statements.MAX_TITLE] or "(no title yet)",
        body_html=html,
        body_text=text,
        author=values["author"].strip() or None,
        url=values["url"].strip() or None,
    )
    rendered = ctx.renderer.preview_html(content)
    key = _preview_key(ctx, posted.admin.editor_id, draft_id)
    version = await ctx.runtime.redis.incr(key + ":v")
    await ctx.runtime.redis.expire(key + ":v", PREVIEW_TTL_S)
    await ctx.runtime.redis.set(key, rendered, ex=PREVIEW_TTL_S)
    return JSONResponse({"url": f"/admin/preview/{draft_id}?v={version}"})


@router.get("/preview/{draft_id}")
async def draft_preview(request: Request, draft_id: str, admin: Signed) -> Response:
    ctx = get_ctx(request)
    html = None
    if _DRAFT_ID.fullmatch(draft_id):
        html = await ctx.runtime.redis.get(_preview_key(ctx, admin.editor_id, draft_id))
    if html is None:
        return HTMLResponse(
            "<p>This preview expired; type in the editor to refresh it.</p>",
            404,
            headers=PREVIEW_HEADERS,
        )
    return HTMLResponse(bytes(html).decode(), headers=PREVIEW_HEADERS)


def _split_addresses(raw: str) -> list[str]:
    parts = [p for p in re.split(r"[\s,;]+", raw) if p]
    if not parts:
        raise InvalidInput("to", "enter at least one address")
    if len(parts) > MAX_TEST_RECIPIENTS:
        raise InvalidInput("to", f"at most {MAX_TEST_RECIPIENTS} addresses at a time")
    out: list[str] = []
    for part in parts:
        try:
            address = normalize_email(part)
        except InvalidInput as exc:
            raise InvalidInput("to", f"{part[:100]!r}: {exc.message}") from None
        if address not in out:
            out.append(address)
    return out


@router.post("/statements/{statement_id}/test", response_class=HTMLResponse)
async def test_send(request: Request, statement_id: StatementId, posted: Post) -> Response:
    ctx = get_ctx(request)
    try:
        recipients = _split_addresses(posted.text("to"))
    except InvalidInput as exc:
        return await show_statement(
            request,
            posted.admin,
            statement_id,
            422,
            Flash("error", f"No test sent. {exc.field}: {exc.message}"),
        )
    async with ctx.runtime.sessions() as session:
        statement = await statements.get_statement(session, statement_id)
    if statement is None:
        return await show_statement(request, posted.admin, statement_id)
    try:
        results = await send_test_copies(ctx, statement, recipients)
    except SmtpConfigError as exc:
        return await show_statement(
            request,
            posted.admin,
            statement_id,
            502,
            Flash("error", f"No test sent: the SMTP relay is unusable ({exc})."),
        )
    sent = [a for a, r in results.items() if r == "sent"]
    refused = [f"{a} ({r})" for a, r in results.items() if r != "sent"]
    text = f"Test copy sent to {', '.join(sent)}." if sent else ""
    if refused:
        text += f" Refused: {'; '.join(refused)}."
    return redirect(
        request, f"/admin/statements/{statement_id}", text.strip(), "error" if refused else "ok"
    )


def _send_at(posted: Posted) -> datetime | None:
    if posted.text("when") != "at":
        return None
    raw = posted.text("send_at").strip()
    if not raw:
        raise InvalidInput("send_at", "choose a date and time (UTC), or press Blast now")
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidInput("send_at", f"{raw[:40]!r} is not a date and time") from None
    # The form says UTC; an explicit offset (from a script) is honoured as given.
    try:
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise InvalidInput("send_at", f"{raw[:40]!r} is out of range") from None
    if value < utcnow() - PAST_GRACE:
        now = utcnow().strftime("%Y-%m-%d %H:%M")
        raise InvalidInput("send_at", f"{value:%Y-%m-%d %H:%M} UTC is in the past (now: {now})")
    return value


@router.post("/statements/{statement_id}/blast", response_class=HTMLResponse)
async def blast_statement(request: Request, statement_id: StatementId, posted: Post) -> Response:
    ctx = get_ctx(request)
    try:
        send_at = _send_at(posted)
    except InvalidInput as exc:
        return await show_statement(
            request,
            posted.admin,
            statement_id,
            422,
            Flash("error", f"Not blasted. {exc.field}: {exc.message}"),
        )
    try:
        blast = await blasts.create(
            ctx.runtime, ctx.queue, statement_id, send_at, posted.admin.editor_id
        )
    except MailerError as exc:
        return await show_statement(
            request, posted.admin, statement_id, status_for(exc), Flash("error", str(exc))
        )
    if blast.status == BlastStatus.scheduled and blast.send_at is not None:
        text = f"Blast #{blast.id} scheduled for {blast.send_at:%Y-%m-%d %H:%M} UTC."
    else:
        text = f"Blast #{blast.id} started."
    return redirect(request, "/admin/blasts", text)
