"""Signing in with an editor token, and out."""

from __future__ import annotations

import secrets

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from mailer.editors import authenticate
from mailer.web.admin.session import (
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    Flash,
    Post,
    Signed,
    admin_router,
    current_session,
    delete_cookie,
    log,
    redirect,
    render,
    secure_cookies,
    serializer,
)
from mailer.web.context import client_ip, get_ctx

router = admin_router()


@router.get("", response_class=HTMLResponse)
async def home(_: Signed) -> Response:
    return RedirectResponse("/admin/statements", 303)


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request) -> Response:
    if await current_session(request) is not None:
        return RedirectResponse("/admin/statements", 303)
    return render(request, "login.html", None)


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
        return render(
            request,
            "login.html",
            None,
            401,
            flash=Flash("error", "That editor token is not valid. Check it and try again."),
        )
    # A fresh CSRF secret per login: a token seen in an old page dies with its session.
    value = serializer(ctx, "session").dumps({"e": editor.id, "c": secrets.token_hex(16)})
    response = redirect(request, "/admin/statements", f"Signed in as {editor.name}.")
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=SESSION_MAX_AGE_S,
        path="/admin",
        httponly=True,
        samesite="lax",
        secure=secure_cookies(ctx),
    )
    log.info("admin: editor %s signed in", editor.id)
    return response


@router.post("/logout")
async def logout(request: Request, _: Post) -> Response:
    response = redirect(request, "/admin/login", "Signed out.")
    delete_cookie(get_ctx(request), response, SESSION_COOKIE)
    return response
