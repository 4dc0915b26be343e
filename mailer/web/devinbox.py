"""``/dev/inbox``: what the embedded SMTP catcher received. Mounted only when MAILER_ENV=dev."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from mailer.devsmtp import get_message, list_messages
from mailer.web.context import get_ctx
from mailer.web.deps import problem

router = APIRouter(prefix="/dev")


@router.get("/inbox", response_class=HTMLResponse)
async def inbox(request: Request) -> HTMLResponse:
    ctx = get_ctx(request)
    messages = list_messages(ctx.runtime.settings.dev_inbox_dir)
    return ctx.templates.TemplateResponse(request, "dev_inbox.html", {"messages": messages})


@router.get(
    "/inbox/{message_id}", response_class=HTMLResponse, responses={404: problem("no such message")}
)
async def message(request: Request, message_id: str) -> HTMLResponse:
    ctx = get_ctx(request)
    found = get_message(ctx.runtime.settings.dev_inbox_dir, message_id)
    if found is None:
        raise HTTPException(404, "no such message")
    return ctx.templates.TemplateResponse(
        request,
        "dev_message.html",
        {"m": found, "text": found.body("plain"), "has_html": found.body("html") is not None},
    )


@router.get("/inbox/{message_id}/html", responses={404: problem("no such message or no HTML")})
async def message_html(request: Request, message_id: str) -> Response:
    """The HTML part alone, shown in a sandboxed frame: mail HTML is never trusted."""
    ctx = get_ctx(request)
    found = get_message(ctx.runtime.settings.dev_inbox_dir, message_id)
    html = found.body("html") if found else None
    if html is None:
        raise HTTPException(404, "no HTML part")
    return HTMLResponse(
        html,
        headers={
            "Content-Security-Policy": "sandbox; default-src 'none'; style-src 'unsafe-inline'; "
            "img-src data:; frame-ancestors 'self'",
            "X-Frame-Options": "SAMEORIGIN",
        },
    )
