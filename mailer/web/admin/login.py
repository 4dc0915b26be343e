"""Signing in with an editor token, and out."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from mailer.editors import authenticate
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
    response = start_session(request, editor, "/admin/statements", f"Signed in as {editor.name}.")
    log.info("admin: editor %s signed in", editor.id)
    return response


@router.post("/logout")
async def logout(request: Request, _: Post) -> Response:
    response = redirect(request, "/admin/login", "Signed out.")
    delete_cookie(get_ctx(request), response, SESSION_COOKIE)
    return response
