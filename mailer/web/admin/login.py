"""Signing in with an editor token, and out.

The login is the one admin POST without a CSRF token (there is no session yet), so it
checks where the form came from instead: a browser names the page's origin in
``Origin`` on every POST, and a sign-in posted from another site is refused (it would
sign the victim in to the attacker's account). The login page says
``<meta name="referrer" content="same-origin">`` (templates/web/admin/login.html),
because under the site-wide ``no-referrer`` browsers send ``Origin: null`` even for our
own form; the meta element overrides the header for that page alone.

Attempts are limited per client address (an IPv4 address, an IPv6 /64) in Redis, a
token that cannot be one is refused before any query, and the lookup itself only
reads: a flood of logins never takes SQLite's write lock (docs/security.md).
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from mailer import admin_sessions
from mailer.editors import authenticate, well_formed
from mailer.web.admin.session import (
    SESSION_COOKIE,
    Flash,
    Post,
    Signed,
    admin_router,
    current_session,
    delete_cookie,
    log,
    redirect,
    render,
    start_session,
)
from mailer.web.context import AppContext, client_ip, get_ctx, rate_limit_key

router = admin_router()

LOGIN_ATTEMPTS = 10  # failed sign-ins per client address per window
LOGIN_WINDOW_S = 300


def _origin_of(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def same_origin(request: Request, base_url: str) -> bool:
    """Whether a POST came from a page of ours. ``Origin`` first, ``Referer`` if it is
    missing; a request with neither is no browser's cross-site form (browsers always
    send ``Origin`` on those), so it passes. ``Origin: null`` does not."""
    claimed = request.headers.get("origin") or request.headers.get("referer")
    if claimed is None:
        return True
    return _origin_of(claimed) == _origin_of(base_url)


async def _count_attempt(ctx: AppContext, ip: str) -> tuple[str, int]:
    """Count this attempt: its counter's key, and the seconds to wait when over the limit
    (else 0). Counted before anything else, so concurrent floods are counted too."""
    window = int(time.time() // LOGIN_WINDOW_S)
    key = ctx.runtime.keys.admin_login(rate_limit_key(ip), window)
    async with ctx.runtime.redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, LOGIN_WINDOW_S * 2)
        count, _ = await pipe.execute()
    if int(count) <= LOGIN_ATTEMPTS:
        return key, 0
    return key, max(1, (window + 1) * LOGIN_WINDOW_S - int(time.time()))


def _login_page(request: Request, status: int = 200, flash: Flash | None = None) -> Response:
    return render(request, "login.html", None, status, flash=flash)


@router.get("", response_class=HTMLResponse)
async def home(_: Signed) -> Response:
    return RedirectResponse("/admin/statements", 303)


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request) -> Response:
    if await current_session(request) is not None:
        return RedirectResponse("/admin/statements", 303)
    return _login_page(request)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    ctx = get_ctx(request)
    ip = client_ip(request, ctx.runtime.settings.trusted_networks)
    if not same_origin(request, ctx.runtime.settings.base_url):
        claimed = request.headers.get("origin") or request.headers.get("referer") or ""
        log.warning("admin: refused a sign-in from %s posted by %r", ip, claimed[:200])
        message = "This sign-in was not sent from this site's login page. Nothing was done."
        return _login_page(request, 403, Flash("error", message))
    counter, wait = await _count_attempt(ctx, ip)
    if wait:
        log.warning("admin: too many sign-in attempts from %s", ip)
        message = "Too many sign-in attempts from your network. Please wait and try again."
        response = _login_page(request, 429, Flash("error", message))
        response.headers["Retry-After"] = str(wait)
        return response
    form = await request.form()
    token = form.get("token")
    token = token.strip() if isinstance(token, str) else ""
    editor = None
    if well_formed(token):  # anything else is refused before any query
        async with ctx.runtime.reads() as session:
            editor = await authenticate(session, token)
    if editor is None:
        log.warning("admin: failed login from %s", ip)
        message = "That editor token is not valid. Check it and try again."
        return _login_page(request, 401, Flash("error", message))
    # Only failures count against the address (editors behind one office NAT).
    await ctx.runtime.redis.decr(counter)
    response = await start_session(
        request, editor, "/admin/statements", f"Signed in as {editor.name}."
    )
    log.info("admin: editor %s signed in", editor.id)
    return response


@router.post("/logout")
async def logout(request: Request, posted: Post) -> Response:
    ctx = get_ctx(request)
    admin = posted.admin
    await admin_sessions.end(ctx.runtime.redis, ctx.runtime.keys, admin.session_id, admin.editor_id)
    response = redirect(request, "/admin/login", "Signed out.")
    delete_cookie(ctx, response, SESSION_COOKIE)
    return response
