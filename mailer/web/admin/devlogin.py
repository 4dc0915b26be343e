"""``/admin/login/{token}``: the one-time sign-in link ``mailer dev`` prints (mailer/dev_login.py).

Mounted by ``mailer/web/app.py`` only when ``MAILER_ENV=dev``; anywhere else the path
is a 404. The GET shows a page with a "Sign in" button and changes nothing; the POST
uses the token up and starts a session the way the token login does.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from mailer import dev_login
from mailer.models import Editor
from mailer.web.admin.session import admin_router, log, render, start_session
from mailer.web.context import get_ctx

router = admin_router()

USED_UP = (
    "This sign-in link has expired or was already used. Each start of mailer dev prints a "
    "new one; or sign in with an editor token."
)


def _refused(request: Request) -> Response:
    return render(
        request,
        "error.html",
        None,
        410,
        heading="This link no longer works",
        message=USED_UP,
    )


@router.get("/login/{token}", response_class=HTMLResponse)
async def dev_login_page(request: Request, token: str) -> Response:
    if not await dev_login.is_valid(get_ctx(request).runtime, token):
        return _refused(request)
    minutes = dev_login.LINK_TTL_S // 60
    return render(request, "dev_login.html", None, token=token, minutes=minutes)


@router.post("/login/{token}", response_class=HTMLResponse)
async def dev_login_post(request: Request, token: str) -> Response:
    ctx = get_ctx(request)
    editor_id = await dev_login.consume(ctx.runtime, token)
    if editor_id is None:
        return _refused(request)
    async with ctx.runtime.sessions() as session:
        editor = await session.get(Editor, editor_id)
    if editor is None or editor.disabled:
        return _refused(request)
    log.info("admin: editor %s signed in with a dev login link", editor.id)
    return await start_session(request, editor, "/admin/statements", f"Signed in as {editor.name}.")
