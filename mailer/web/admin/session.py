"""Admin sessions: the session cookie, the CSRF check, flash messages and page rendering.

Browsers cannot attach a bearer token to a form post, so an editor trades the
token once for a session cookie (HttpOnly, SameSite=Lax, Path=/admin) that carries
only the signed id of a session kept in Redis (``mailer/admin_sessions.py``), so
logging out, disabling the editor or rotating their token ends it. Because a cookie
rides along on cross-site posts too, every POST except the login carries a CSRF token
derived from a secret of that session, and is refused before anything is read or
written when the token does not match. Cookies and CSRF tokens are signed with the
current key only: a key kept in ``MAILER_OLD_SECRET_KEYS`` for old unsubscribe links
opens no admin session (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from itsdangerous import BadData, URLSafeTimedSerializer
from starlette.datastructures import FormData

from mailer import admin_sessions
from mailer.editors import generation
from mailer.models import Editor
from mailer.web.context import AppContext, get_ctx

log = logging.getLogger("mailer.admin")

SESSION_COOKIE = "mailer_admin"
FLASH_COOKIE = "mailer_admin_flash"
SESSION_MAX_AGE_S = admin_sessions.SESSION_TTL_S
FLASH_MAX_AGE_S = 120
CSRF_FIELD = "csrf_token"


class Stop(Exception):
    """Ends a request early with a ready response: the way to log in, or a refusal."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


class AdminRoute(APIRoute):
    """Turns ``Stop`` into its response and keeps every admin answer out of caches:
    pages carry CSRF tokens and subscriber data."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                response = await handler(request)
            except Stop as stop:
                response = stop.response
            response.headers.setdefault("Cache-Control", "no-store")
            return response

        return run


def admin_router() -> APIRouter:
    """A router for one part of the admin UI; ``web/admin/__init__.py`` joins them."""
    return APIRouter(prefix="/admin", route_class=AdminRoute, include_in_schema=False)


@dataclass(frozen=True)
class AdminSession:
    editor_id: int
    editor_name: str
    csrf_token: str
    session_id: str = ""  # the id in the cookie, for logging out


@dataclass(frozen=True)
class Posted:
    """A POST that passed the CSRF check, with its form already read."""

    admin: AdminSession
    form: FormData

    def text(self, name: str) -> str:
        value = self.form.get(name)
        return value if isinstance(value, str) else ""


def serializer(ctx: AppContext, purpose: str) -> URLSafeTimedSerializer:
    # The current key alone (signing_keys ends with it): old keys verify mailed links,
    # never admin cookies, so a rotation also ends every session signed before it.
    current = ctx.runtime.settings.signing_keys[-1]
    return URLSafeTimedSerializer(current, salt=f"mailer.admin.{purpose}")


def _csrf_token(ctx: AppContext, secret: str) -> str:
    key = ctx.runtime.settings.signing_keys[-1].encode()
    return hmac.new(key, b"admin-csrf:" + secret.encode(), hashlib.sha256).hexdigest()


def secure_cookies(ctx: AppContext) -> bool:
    return ctx.runtime.settings.base_url.startswith("https://")


def delete_cookie(ctx: AppContext, response: Response, name: str) -> None:
    """Ends a cookie with the same attributes it was set with (HttpOnly, SameSite, Secure)."""
    response.delete_cookie(
        name, path="/admin", httponly=True, samesite="lax", secure=secure_cookies(ctx)
    )


def _to_login(request: Request) -> Response:
    response = RedirectResponse("/admin/login", 303)
    if SESSION_COOKIE in request.cookies:
        delete_cookie(get_ctx(request), response, SESSION_COOKIE)
    return response


async def current_session(request: Request) -> AdminSession | None:
    ctx = get_ctx(request)
    raw = request.cookies.get(SESSION_COOKIE)
    if not raw:
        return None
    try:
        session_id = serializer(ctx, "session").loads(raw, max_age=SESSION_MAX_AGE_S)
    except BadData:
        return None
    if not isinstance(session_id, str):
        return None
    stored = await admin_sessions.load(ctx.runtime.redis, ctx.runtime.keys, session_id)
    if stored is None:  # logged out, ended, expired, or never existed
        return None
    # Looked up every time (read-only: no write lock), so disabling an editor or
    # rotating their token ends their sessions at once.
    async with ctx.runtime.reads() as session:
        editor = await session.get(Editor, stored.editor_id)
    if editor is None or editor.disabled or generation(editor) != stored.generation:
        return None
    return AdminSession(editor.id, editor.name, _csrf_token(ctx, stored.csrf_secret), session_id)


async def start_session(request: Request, editor: Editor, url: str, text: str) -> Response:
    """Sign ``editor`` in: the redirect to ``url`` (with ``text`` as its flash message)
    carrying a new session cookie. The one way a session begins, whichever proof the
    editor gave (their token at ``/admin/login``, a dev login link)."""
    ctx = get_ctx(request)
    # A fresh session (and CSRF secret) per login: a token seen in an old page dies with it.
    session_id = await admin_sessions.begin(
        ctx.runtime.redis, ctx.runtime.keys, editor.id, generation(editor)
    )
    value = serializer(ctx, "session").dumps(session_id)
    response = redirect(request, url, text)
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=SESSION_MAX_AGE_S,
        path="/admin",
        httponly=True,
        samesite="lax",
        secure=secure_cookies(ctx),
    )
    return response


async def _signed_in(request: Request) -> AdminSession:
    admin = await current_session(request)
    if admin is None:
        raise Stop(_to_login(request))
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
        raise Stop(
            render(
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
        kind, text = serializer(get_ctx(request), "flash").loads(raw, max_age=FLASH_MAX_AGE_S)
    except (BadData, ValueError, TypeError):
        return None
    return Flash(str(kind), str(text))


def redirect(request: Request, url: str, text: str, kind: str = "ok") -> Response:
    """Post/redirect/get: the message survives the redirect in a signed, short-lived cookie."""
    ctx = get_ctx(request)
    response = RedirectResponse(url, 303)
    value = serializer(ctx, "flash").dumps([kind, text[:1500]])
    response.set_cookie(
        FLASH_COOKIE,
        value,
        max_age=FLASH_MAX_AGE_S,
        path="/admin",
        httponly=True,
        samesite="lax",
        secure=secure_cookies(ctx),
    )
    return response


def render(
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
        delete_cookie(ctx, response, FLASH_COOKIE)
    return response
