"""The editors' admin UI under ``/admin``: compose, preview, test, blast, watch, erase.

Browsers cannot attach a bearer token to a form post, so an editor trades the
token once for a signed session cookie (HttpOnly, SameSite=Lax, Path=/admin).
Because a cookie rides along on cross-site posts too, every POST except the
login carries a CSRF token derived from a secret inside that cookie, and is
refused before anything is read or written when the token does not match.

The app's CSP forbids inline scripts and styles, so behaviour lives in
``static/admin.js`` and email previews, whose HTML carries inline styles, are
served from their own endpoints with a sandboxing CSP and shown in a
``sandbox`` iframe.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from itsdangerous import BadData, URLSafeTimedSerializer
from pydantic import ValidationError
from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import FormData

from mailer import blasts, privacy, statements
from mailer.db import utcnow
from mailer.editors import authenticate
from mailer.errors import MailerError
from mailer.models import (
    Blast,
    BlastStatus,
    Delivery,
    DeliveryStatus,
    Editor,
    Statement,
    Subscriber,
    SubscriberEvent,
    SubscriberStatus,
)
from mailer.render import StatementContent
from mailer.smtp import SmtpConfigError
from mailer.subscriptions import InvalidInput, has_control, normalize_email
from mailer.web.api import BlastId, Offset, StatementId, SubscriberId, send_test_copies
from mailer.web.context import AppContext, client_ip, get_ctx
from mailer.web.deps import status_for

log = logging.getLogger("mailer.admin")

SESSION_COOKIE = "mailer_admin"
FLASH_COOKIE = "mailer_admin_flash"
SESSION_MAX_AGE_S = 12 * 3600
FLASH_MAX_AGE_S = 120
PREVIEW_TTL_S = 1800
CSRF_FIELD = "csrf_token"
MAX_TEST_RECIPIENTS = 20
# A datetime-local picked "now" is already a minute old by the time it is submitted.
PAST_GRACE = timedelta(minutes=5)
TERMINAL = (BlastStatus.done, BlastStatus.cancelled)
DONE = {"pause": "paused", "resume": "resumed", "cancel": "cancelled; nothing more will be sent"}
# The sandbox keeps mail HTML from running scripts, submitting forms or reaching the
# admin's origin; inline styles are what make the preview look like the email.
PREVIEW_HEADERS = {
    "Content-Security-Policy": "sandbox; default-src 'none'; style-src 'unsafe-inline'; "
    "img-src data: https:; frame-ancestors 'self'",
    "X-Frame-Options": "SAMEORIGIN",
    "Cache-Control": "no-store",
}
_DRAFT_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")


class _Stop(Exception):
    """Ends a request early with a ready response: the way to log in, or a refusal."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


class _AdminRoute(APIRoute):
    """Turns ``_Stop`` into its response and keeps every admin answer out of caches:
    pages carry CSRF tokens and subscriber data."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                response = await handler(request)
            except _Stop as stop:
                response = stop.response
            response.headers.setdefault("Cache-Control", "no-store")
            return response

        return run


router = APIRouter(prefix="/admin", route_class=_AdminRoute, include_in_schema=False)


# Sessions, CSRF and flash messages ----------------------------------------------------


@dataclass(frozen=True)
class AdminSession:
    editor_id: int
    editor_name: str
    csrf_token: str


@dataclass(frozen=True)
class Posted:
    """A POST that passed the CSRF check, with its form already read."""

    admin: AdminSession
    form: FormData

    def text(self, name: str) -> str:
        value = self.form.get(name)
        return value if isinstance(value, str) else ""


def _serializer(ctx: AppContext, purpose: str) -> URLSafeTimedSerializer:
    # signing_keys ends with the current key; older ones still verify (rotation).
    return URLSafeTimedSerializer(ctx.runtime.settings.signing_keys, salt=f"mailer.admin.{purpose}")


def _csrf_token(ctx: AppContext, secret: str) -> str:
    key = ctx.runtime.settings.signing_keys[-1].encode()
    return hmac.new(key, b"admin-csrf:" + secret.encode(), hashlib.sha256).hexdigest()


def _secure(ctx: AppContext) -> bool:
    return ctx.runtime.settings.base_url.startswith("https://")


def _delete_cookie(ctx: AppContext, response: Response, name: str) -> None:
    """Ends a cookie with the same attributes it was set with (HttpOnly, SameSite, Secure)."""
    response.delete_cookie(name, path="/admin", httponly=True, samesite="lax", secure=_secure(ctx))


def _to_login(request: Request) -> Response:
    response = RedirectResponse("/admin/login", 303)
    if SESSION_COOKIE in request.cookies:
        _delete_cookie(get_ctx(request), response, SESSION_COOKIE)
    return response


async def _current(request: Request) -> AdminSession | None:
    ctx = get_ctx(request)
    raw = request.cookies.get(SESSION_COOKIE)
    if not raw:
        return None
    try:
        data = _serializer(ctx, "session").loads(raw, max_age=SESSION_MAX_AGE_S)
    except BadData:
        return None
    if not isinstance(data, dict):
        return None
    editor_id, secret = data.get("e"), data.get("c")
    if not isinstance(editor_id, int) or not isinstance(secret, str):
        return None
    # Looked up every time, so disabling an editor ends their sessions at once.
    async with ctx.runtime.sessions() as session:
        editor = await session.get(Editor, editor_id)
    if editor is None or editor.disabled:
        return None
    return AdminSession(editor.id, editor.name, _csrf_token(ctx, secret))


async def _signed_in(request: Request) -> AdminSession:
    admin = await _current(request)
    if admin is None:
        raise _Stop(_to_login(request))
    return admin


Signed = Annotated[AdminSession, Depends(_signed_in)]


async def _posted(request: Request, admin: Signed) -> Posted:
    form = await request.form()
    sent = form.get(CSRF_FIELD)
    if not isinstance(sent, str):
        sent = request.headers.get("x-csrf-token", "")
    if not hmac.compare_digest(sent.encode(), admin.csrf_token.encode()):
        log.warning(
            "admin: refused %s %s without a valid CSRF token", request.method, request.url.path
        )
        raise _Stop(
            _render(
                request,
                "error.html",
                admin,
                403,
                heading="This form could not be accepted",
                message="The form was not sent from this admin page, or the page is too old. "
                "Go back, reload the page and try again. Nothing was changed.",
            )
        )
    return Posted(admin, form)


Post = Annotated[Posted, Depends(_posted)]


@dataclass(frozen=True)
class Flash:
    kind: str  # "ok" or "error"
    text: str


def _read_flash(request: Request) -> Flash | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    try:
        kind, text = _serializer(get_ctx(request), "flash").loads(raw, max_age=FLASH_MAX_AGE_S)
    except (BadData, ValueError, TypeError):
        return None
    return Flash(str(kind), str(text))


def _redirect(request: Request, url: str, text: str, kind: str = "ok") -> Response:
    """Post/redirect/get: the message survives the redirect in a signed, short-lived cookie."""
    ctx = get_ctx(request)
    response = RedirectResponse(url, 303)
    value = _serializer(ctx, "flash").dumps([kind, text[:1500]])
    response.set_cookie(
        FLASH_COOKIE,
        value,
        max_age=FLASH_MAX_AGE_S,
        path="/admin",
        httponly=True,
        samesite="lax",
        secure=_secure(ctx),
    )
    return response


def _render(
    request: Request,
    name: str,
    admin: AdminSession | None,
    status: int = 200,
    flash: Flash | None = None,
    **values: Any,
) -> HTMLResponse:
    ctx = get_ctx(request)
    shown = flash or _read_flash(request)
    context = {"admin": admin, "flash": shown, "csrf_field": CSRF_FIELD, **values}
    response = ctx.templates.TemplateResponse(request, f"admin/{name}", context, status_code=status)
    if FLASH_COOKIE in request.cookies:
        _delete_cookie(ctx, response, FLASH_COOKIE)
    return response


# Logging in and out ---------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
async def home(_: Signed) -> Response:
    return RedirectResponse("/admin/statements", 303)


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request) -> Response:
    if await _current(request) is not None:
        return RedirectResponse("/admin/statements", 303)
    return _render(request, "login.html", None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    ctx = get_ctx(request)
    form = await request.form()
    token = form.get("token")
    editor = None
    if isinstance(token, str) and token.strip():
        async with ctx.runtime.sessions() as session:
            editor = await authenticate(session, token.strip())
    if editor is None:
        ip = client_ip(request, ctx.runtime.settings.trusted_networks)
        log.warning("admin: failed login from %s", ip)
        return _render(
            request,
            "login.html",
            None,
            401,
            flash=Flash("error", "That editor token is not valid. Check it and try again."),
        )
    # A fresh CSRF secret per login: a token seen in an old page dies with its session.
    value = _serializer(ctx, "session").dumps({"e": editor.id, "c": secrets.token_hex(16)})
    response = _redirect(request, "/admin/statements", f"Signed in as {editor.name}.")
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=SESSION_MAX_AGE_S,
        path="/admin",
        httponly=True,
        samesite="lax",
        secure=_secure(ctx),
    )
    log.info("admin: editor %s signed in", editor.id)
    return response


@router.post("/logout")
async def logout(request: Request, _: Post) -> Response:
    response = _redirect(request, "/admin/login", "Signed out.")
    _delete_cookie(get_ctx(request), response, SESSION_COOKIE)
    return response


# Statements -------------------------------------------------------------------------------


async def _lock_reason(session: AsyncSession, statement_id: int) -> str | None:
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


def _form_statement(posted: Posted) -> dict[str, str]:
    return {
        name: posted.text(name).replace("\r\n", "\n")
        for name in ("title", "author", "url", "body_markdown")
    }


def _problems(exc: ValidationError) -> str:
    out = []
    for err in exc.errors():
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        field = ".".join(str(p) for p in err.get("loc", ()))
        out.append(msg if field and msg.startswith(field) else f"{field}: {msg}")
    return "; ".join(out)


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
    return [{"s": s, "blast": latest.get(s.id)} for s in items]


@router.get("/statements", response_class=HTMLResponse)
async def statements_page(request: Request, admin: Signed) -> Response:
    async with get_ctx(request).runtime.sessions() as session:
        rows = await _statement_rows(session)
    return _render(request, "statements.html", admin, section="statements", rows=rows)


def _compose(
    request: Request,
    admin: AdminSession,
    *,
    statement: Statement | None,
    values: dict[str, str],
    status: int = 200,
    flash: Flash | None = None,
    extra: dict[str, Any] | None = None,
) -> HTMLResponse:
    return _render(
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


@router.get("/statements/new", response_class=HTMLResponse)
async def new_statement(request: Request, admin: Signed) -> Response:
    return _compose(request, admin, statement=None, values={})


@router.post("/statements", response_class=HTMLResponse)
async def create_statement(request: Request, posted: Post) -> Response:
    values = _form_statement(posted)
    try:
        data = statements.StatementIn(**values)
    except ValidationError as exc:
        return _compose(
            request,
            posted.admin,
            statement=None,
            values=values,
            status=422,
            flash=Flash("error", f"Not saved: {_problems(exc)}"),
        )
    async with get_ctx(request).runtime.sessions() as session:
        statement = await statements.create_statement(session, data, posted.admin.editor_id)
    return _redirect(request, f"/admin/statements/{statement.id}", f"Saved draft #{statement.id}.")


async def _statement_page(
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
            return _render(
                request,
                "error.html",
                admin,
                404,
                heading="No such statement",
                message=f"There is no statement #{statement_id}.",
            )
        locked = await _lock_reason(session, statement_id)
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
    return _compose(
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


@router.get("/statements/{statement_id}", response_class=HTMLResponse)
async def statement_page(request: Request, statement_id: StatementId, admin: Signed) -> Response:
    return await _statement_page(request, admin, statement_id)


@router.post("/statements/{statement_id}", response_class=HTMLResponse)
async def update_statement(request: Request, statement_id: StatementId, posted: Post) -> Response:
    values = _form_statement(posted)
    try:
        data = statements.StatementIn(**values)
    except ValidationError as exc:
        return await _statement_page(
            request,
            posted.admin,
            statement_id,
            422,
            Flash("error", f"Not saved: {_problems(exc)}"),
            values,
        )
    async with get_ctx(request).runtime.sessions() as session:
        # Row lock first: a blast insert (its foreign key) waits for this transaction, and
        # one committed before it is seen by the check below.
        if await session.get(Statement, statement_id, with_for_update=True) is None:
            await session.rollback()
            return await _statement_page(request, posted.admin, statement_id)
        locked = await _lock_reason(session, statement_id)
        if locked is None:
            await statements.update_statement(session, statement_id, data, posted.admin.editor_id)
        else:
            await session.rollback()
    if locked is not None:
        return await _statement_page(
            request, posted.admin, statement_id, 409, Flash("error", f"Not saved. {locked}")
        )
    return _redirect(request, f"/admin/statements/{statement_id}", "Saved.")


@router.get("/statements/{statement_id}/preview")
async def statement_preview(request: Request, statement_id: StatementId, _: Signed) -> Response:
    ctx = get_ctx(request)
    async with ctx.runtime.sessions() as session:
        statement = await statements.get_statement(session, statement_id)
    if statement is None:
        return HTMLResponse("no such statement", 404, headers=PREVIEW_HEADERS)
    html = ctx.renderer.preview_html(StatementContent.from_model(statement))
    return HTMLResponse(html, headers=PREVIEW_HEADERS)


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
    values = _form_statement(posted)
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
        return await _statement_page(
            request,
            posted.admin,
            statement_id,
            422,
            Flash("error", f"No test sent. {exc.field}: {exc.message}"),
        )
    async with ctx.runtime.sessions() as session:
        statement = await statements.get_statement(session, statement_id)
    if statement is None:
        return await _statement_page(request, posted.admin, statement_id)
    try:
        results = await send_test_copies(ctx, statement, recipients)
    except SmtpConfigError as exc:
        return await _statement_page(
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
    return _redirect(
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
        return await _statement_page(
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
        return await _statement_page(
            request, posted.admin, statement_id, status_for(exc), Flash("error", str(exc))
        )
    if blast.status == BlastStatus.scheduled and blast.send_at is not None:
        text = f"Blast #{blast.id} scheduled for {blast.send_at:%Y-%m-%d %H:%M} UTC."
    else:
        text = f"Blast #{blast.id} started."
    return _redirect(request, "/admin/blasts", text)


# Blasts ------------------------------------------------------------------------------------


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
    return _render(request, "blasts.html", admin, status, flash, section="blasts", rows=rows)


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
            return _render(
                request,
                "error.html",
                admin,
                404,
                heading="No such blast",
                message=f"There is no blast #{blast_id}.",
            )
        titles = await _titles(session, [p.statement_id])
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
    return _render(
        request,
        "blast.html",
        admin,
        section="blasts",
        p=p,
        percent=_percent(p),
        title=titles.get(p.statement_id),
        problems=problems,
    )


@router.post("/blasts/{blast_id}/{action}", response_class=HTMLResponse)
async def blast_action(request: Request, blast_id: BlastId, action: str, posted: Post) -> Response:
    ctx = get_ctx(request)
    try:
        await blasts.apply_action(ctx.runtime, ctx.queue, blast_id, action)
    except blasts.UnknownAction:
        return _render(
            request,
            "error.html",
            posted.admin,
            404,
            heading="Unknown action",
            message="A blast can be paused, resumed or cancelled.",
        )
    except MailerError as exc:
        return await _blasts_page(request, posted.admin, status_for(exc), Flash("error", str(exc)))
    return _redirect(request, "/admin/blasts", f"Blast #{blast_id} {DONE[action]}.")


# Subscribers -------------------------------------------------------------------------------

PAGE_SIZE = 50


@router.get("/subscribers", response_class=HTMLResponse)
async def subscribers_page(
    request: Request,
    admin: Signed,
    q: Annotated[str, Query(max_length=320)] = "",
    status: Annotated[str, Query(max_length=20)] = "",
    offset: Offset = 0,
) -> Response:
    ctx = get_ctx(request)
    q = "".join(" " if has_control(ch) else ch for ch in q)  # NUL would break PostgreSQL
    wanted = status if status in {s.value for s in SubscriberStatus} else ""
    query = select(Subscriber)
    count = select(func.count()).select_from(Subscriber)
    if wanted:
        query = query.where(Subscriber.status == wanted)
        count = count.where(Subscriber.status == wanted)
    needle = q.strip().lower()
    if needle:
        query = query.where(Subscriber.email.contains(needle, autoescape=True))
        count = count.where(Subscriber.email.contains(needle, autoescape=True))
    async with ctx.runtime.sessions() as session:
        by_status = dict(
            (s, int(n))
            for s, n in await session.execute(
                select(Subscriber.status, func.count()).group_by(Subscriber.status)
            )
        )
        matching = int(await session.scalar(count) or 0)
        rows = list(
            await session.scalars(
                query.order_by(Subscriber.id.desc()).limit(PAGE_SIZE).offset(offset)
            )
        )
    counts = {s.value: by_status.get(s.value, 0) for s in SubscriberStatus}
    return _render(
        request,
        "subscribers.html",
        admin,
        section="subscribers",
        counts=counts,
        total=sum(by_status.values()),
        rows=rows,
        matching=matching,
        q=q,
        status_filter=wanted,
        offset=offset,
        page_size=PAGE_SIZE,
        statuses=[s.value for s in SubscriberStatus],
    )


@router.get("/subscribers/{subscriber_id}", response_class=HTMLResponse)
async def subscriber_page(request: Request, subscriber_id: SubscriberId, admin: Signed) -> Response:
    async with get_ctx(request).runtime.sessions() as session:
        sub = await session.get(Subscriber, subscriber_id)
        if sub is None:
            return _render(
                request,
                "error.html",
                admin,
                404,
                heading="No such subscriber",
                message=f"There is no subscriber #{subscriber_id}; they may have been erased.",
            )
        events = list(
            await session.scalars(
                select(SubscriberEvent)
                .where(SubscriberEvent.subscriber_id == subscriber_id)
                .order_by(SubscriberEvent.id)
            )
        )
    return _render(request, "subscriber.html", admin, section="subscribers", sub=sub, events=events)


@router.post("/subscribers/{subscriber_id}/erase", response_class=HTMLResponse)
async def erase(request: Request, subscriber_id: SubscriberId, posted: Post) -> Response:
    ctx = get_ctx(request)
    async with ctx.runtime.sessions() as session:
        erased = await privacy.erase_subscriber(session, ctx.runtime.settings, subscriber_id)
    if not erased:
        return _redirect(
            request, "/admin/subscribers", f"Subscriber #{subscriber_id} does not exist.", "error"
        )
    log.info("admin: editor %s erased subscriber %s", posted.admin.editor_id, subscriber_id)
    return _redirect(
        request,
        "/admin/subscribers",
        f"Subscriber #{subscriber_id} erased: their address and history are gone, and the "
        "address is on the suppression list.",
    )


# Queue panel -------------------------------------------------------------------------------


@router.get("/queue", response_class=HTMLResponse)
async def queue_page(request: Request, admin: Signed) -> Response:
    return _render(
        request,
        "queue.html",
        admin,
        section="queue",
        rate_limit=get_ctx(request).runtime.settings.rate_per_second,
    )


async def _sent_per_minute(ctx: AppContext, now: int) -> list[dict[str, int]]:
    """The last hour of the per-second send log, summed per minute.

    Only the 3,600 fields of the hour are fetched (HMGET), whatever else the hash holds.
    """
    first_minute = now // 60 - 59
    seconds = list(range(first_minute * 60, now + 1))
    fields = [str(s) for s in seconds]
    values: list[Any] = await ctx.runtime.redis.hmget(  # type: ignore[misc]
        ctx.runtime.keys.sent_log, fields
    )
    buckets = [0] * 60
    for second, value in zip(seconds, values, strict=True):
        if value is not None:
            buckets[second // 60 - first_minute] += int(value)
    return [{"minute": (first_minute + i) * 60, "sent": n} for i, n in enumerate(buckets)]


@router.get("/queue.json")
async def queue_json(request: Request, _: Signed) -> JSONResponse:
    ctx = get_ctx(request)
    now = int(time.time())
    stats = await ctx.queue.stats()
    per_minute = await _sent_per_minute(ctx, now)
    async with ctx.runtime.sessions() as session:
        active = await session.scalar(
            select(func.count()).select_from(Blast).where(Blast.status.in_(blasts.ACTIVE))
        )
    return JSONResponse(
        {
            **stats,
            "active_blasts": int(active or 0),
            "per_minute": per_minute,
            "sent_last_hour": sum(m["sent"] for m in per_minute),
            "rate_limit_per_second": ctx.runtime.settings.rate_per_second,
            "now": now,
        }
    )
