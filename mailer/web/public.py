"""Public pages: sign up, confirm, unsubscribe.

GET never changes anything (mail scanners fetch every link); POST acts. The
unsubscribe POST doubles as the RFC 8058 one-click target, so it needs no
cookie, no CSRF token and never redirects. Sign-up replies are identical for
every valid address, so the form cannot be used to probe who is subscribed.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote_plus

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route
from starlette.types import Scope

from mailer import confirmations, subscriptions
from mailer.models import Subscriber
from mailer.signup_guard import admit
from mailer.subscriptions import MAX_EMAIL_LENGTH, MAX_NAME_LENGTH, InvalidInput, Origin
from mailer.tokens import TokenError
from mailer.web.context import AppContext, client_ip, get_ctx, rate_limit_key, wants_json
from mailer.web.cors import site_redirect

router = APIRouter()

ACCEPTED = {
    "status": "accepted",
    "message": "Thank you. If this address can receive mail, a confirmation link is on its way. "
    "Your subscription starts when you click it.",
}


# The sign-up body is read by hand (JSON or a form, one handler for both), so the
# OpenAPI document describes it here for clients and for the schema fuzzer.
_SIGNUP = {
    "type": "object",
    "properties": {
        "email": {"type": "string", "format": "email", "maxLength": MAX_EMAIL_LENGTH},
        "name": {"type": ["string", "null"], "maxLength": MAX_NAME_LENGTH},
        "website": {"description": "a honeypot: leave it out (people never see it)"},
        "source": {
            "type": ["string", "null"],
            "description": "the page signed up on, kept with the consent (cut to 200 characters)",
        },
        "redirect": {
            "type": ["string", "null"],
            "description": "form posts only: where to send the visitor (303) when the URL is "
            "on an origin in MAILER_ALLOWED_ORIGINS; any other value is ignored",
        },
    },
    "required": ["email"],
}
_PROBLEM = {
    "type": "object",
    "properties": {"detail": {"type": "string"}, "field": {"type": "string"}},
    "required": ["detail"],
}
_HTML_OR_PROBLEM = {"text/html": {}, "application/json": {"schema": _PROBLEM}}
SIGNUP_DOC: dict[str, Any] = {
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _SIGNUP},
                "application/x-www-form-urlencoded": {"schema": _SIGNUP},
            },
        }
    },
    "responses": {
        202: {
            "description": "the same answer for every valid address (no enumeration)",
            "content": {
                "text/html": {},
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "status": {"const": "accepted"},
                            "message": {"type": "string"},
                        },
                        "required": ["status", "message"],
                    }
                },
            },
        },
        413: {"description": "body too large", "content": _HTML_OR_PROBLEM},
        422: {"description": "the address or name is invalid", "content": _HTML_OR_PROBLEM},
        429: {"description": "too many sign-ups from this network", "content": _HTML_OR_PROBLEM},
    },
}
LINK_DOC: dict[str, Any] = {
    "responses": {
        400: {"description": "invalid, tampered or expired link", "content": _HTML_OR_PROBLEM}
    }
}


def _page(
    ctx: AppContext,
    request: Request,
    name: str,
    status: int = 200,
    headers: dict[str, str] | None = None,
    **values: Any,
) -> HTMLResponse:
    return ctx.templates.TemplateResponse(
        request, name, values, status_code=status, headers=headers
    )


def _origin(ctx: AppContext, request: Request, source: str) -> Origin:
    return Origin(
        ip=client_ip(request, ctx.runtime.settings.trusted_networks),
        user_agent=request.headers.get("user-agent"),
        source=source,
    )


@router.get("/subscribe", response_class=HTMLResponse)
async def subscribe_form(request: Request) -> HTMLResponse:
    return _page(get_ctx(request), request, "subscribe.html")


# Starlette's limits on a urlencoded form (``Request.form()``'s defaults), kept by
# ``read_urlencoded``: more fields, or a field longer than this, is a 400.
FORM_MAX_FIELDS = 1000
FORM_MAX_FIELD_BYTES = 1024 * 1024
URLENCODED = "application/x-www-form-urlencoded"


def read_urlencoded(body: bytes) -> dict[str, str]:
    """A urlencoded body read exactly as ``Request.form()`` reads it, without python-multipart.

    What every sign-up form posts. Starlette parses it with python-multipart's streaming
    parser, one callback per name and value and an object per request: on the sign-up
    path that was more CPU than the rest of reading the request. The rules are the same
    (tests/test_signup_request.py checks them against Starlette): fields are split at
    ``&``, empty ones are skipped, the name ends at the first ``=`` (no ``=``: an empty
    value), each part is Latin-1 bytes ``unquote_plus``-ed as UTF-8, the last of a
    repeated name wins, and the same two limits answer 400 with Starlette's words.
    """
    fields: dict[str, str] = {}
    count = 0
    for chunk in body.split(b"&"):
        if not chunk:
            continue
        name, _, value = chunk.partition(b"=")
        if len(name) + len(value) > FORM_MAX_FIELD_BYTES:
            limit = FORM_MAX_FIELD_BYTES // 1024
            raise HTTPException(400, f"Field exceeded maximum size of {limit}KB.")
        count += 1
        if count > FORM_MAX_FIELDS:
            raise HTTPException(
                400, f"Too many fields. Maximum number of fields is {FORM_MAX_FIELDS}."
            )
        fields[unquote_plus(name.decode("latin-1"))] = unquote_plus(value.decode("latin-1"))
    return fields


async def _read_form(request: Request) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        try:
            data = json.loads(await request.body() or b"null")
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            raise InvalidInput("body", "is not valid JSON") from None
        if not isinstance(data, dict):
            raise InvalidInput("body", 'must be a JSON object like {"email": "…"}')
        return data
    if ctype.strip(" \t").lower() == URLENCODED:  # with parameters: Starlette's parser
        return read_urlencoded(await request.body())
    form = await request.form()  # multipart (and any other type: an empty form)
    return {k: v for k, v in form.items() if isinstance(v, str)}


@router.post("/subscribe", status_code=202, **SIGNUP_DOC)
async def subscribe(request: Request) -> Response:
    ctx = get_ctx(request)
    settings = ctx.runtime.settings
    as_json = wants_json(request)
    origin = _origin(ctx, request, "web form")
    ip_key = rate_limit_key(origin.ip or "unknown")

    # The body is read (at most MAILER_MAX_BODY_BYTES) before the limits are asked, so
    # that one Redis call counts the IP and, for a valid address, claims its cooldown
    # and domain slot (mailer/signup_guard.py). What the visitor gets is decided in the
    # old order: over the per-IP limit is a 429 whatever the body, then a bad input 422.
    data: dict[str, Any] = {}
    error: InvalidInput | None = None
    email, name, source = "", None, None
    try:
        data = await _read_form(request)
        email = subscriptions.normalize_email(data.get("email"))
        name = subscriptions.normalize_name(data.get("name"))
        source = subscriptions.clean_source(data.get("source"))
        if not isinstance(data.get("redirect", ""), str | None):
            raise InvalidInput("redirect", "must be a string")
    except InvalidInput as exc:
        error = exc
    except Exception:  # the body could not be read (413, a client gone): it still counts
        await admit(ctx.runtime, ip_key, None)
        raise
    # The honeypot (``website``): people never see or fill it, and it gets no mail.
    wanted = error is None and not data.get("website")
    admission = await admit(ctx.runtime, ip_key, email if wanted else None)

    if admission.wait:
        message = "Too many sign-ups from your network. Please try again in a minute."
        headers = {"Retry-After": str(admission.wait)}
        if as_json:
            return JSONResponse({"detail": message}, 429, headers=headers)
        return _page(ctx, request, "subscribe.html", 429, error=message, headers=headers)
    if error is not None:
        if as_json:
            return JSONResponse({"detail": str(error), "field": error.field}, 422)
        typed = data.get("email")
        return _page(
            ctx,
            request,
            "subscribe.html",
            422,
            error=str(error),
            email=typed if isinstance(typed, str) else "",
        )

    if wanted:
        # The limits in Redis decided first, so that SQL records in one transaction the
        # sign-up and the mail it is owed; the job is queued after the commit, and the
        # reconciler queues it again if it is lost (mailer/confirmations.py).
        owed = await subscriptions.subscribe(
            ctx.runtime.engine,
            email,
            name,
            origin,
            resend_after_s=settings.confirm_resend_s,
            source=source,
            mail=admission.mail,
        )
        if owed is not None:
            await confirmations.enqueue_owed(ctx.runtime, ctx.queue, owed)

    if as_json:
        return JSONResponse(ACCEPTED, 202)
    if back := site_redirect(settings, data.get("redirect")):  # back to the campaign site
        return RedirectResponse(back, 303)
    return HTMLResponse(ctx.fixed_page("subscribe_done.html", message=ACCEPTED["message"]), 202)


class PostOnly(Route):
    """A route that answers POST and matches nothing else, so that other methods reach
    the routes they reached before (``GET /subscribe`` the form, and a 405 naming the
    methods it always named)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] != "POST":
            return Match.NONE, {}
        return super().matches(scope)


# POST /subscribe is served by this plain Starlette route, put first in the app's routes
# (mailer/web/app.py): the handler takes only the Request, so FastAPI's per-request work
# (nested router matching, dependency solving, two exit stacks) bought nothing on the
# hottest path. The exception handlers apply as before. The FastAPI route above stays for
# the OpenAPI document; requests never reach it.
SIGNUP_ROUTE = PostOnly("/subscribe", subscribe, methods=["POST"])


def _token_error(ctx: AppContext, request: Request, exc: TokenError) -> Response:
    if wants_json(request):
        return JSONResponse({"detail": exc.reason}, 400)
    return _page(ctx, request, "error.html", 400, message=exc.reason, expired=exc.expired)


async def _known(ctx: AppContext, subscriber_id: int, what: str) -> None:
    """GET pages only read: a signed link to an erased subscriber is still a dead link.
    A read-only session: a flood of link checks never takes SQLite's write lock."""
    async with ctx.runtime.reads() as session:
        if await session.get(Subscriber, subscriber_id) is None:
            raise TokenError(f"This {what} link is not valid.")


@router.get("/confirm/{token}", response_class=HTMLResponse, **LINK_DOC)
async def confirm_page(request: Request, token: str) -> Response:
    ctx = get_ctx(request)
    try:
        claim = ctx.runtime.tokens.read_confirm(token)
        await _known(ctx, claim.subscriber_id, "confirmation")
    except TokenError as exc:
        return _token_error(ctx, request, exc)
    return _page(ctx, request, "confirm.html", token=token)


@router.post("/confirm/{token}", **LINK_DOC)
async def confirm(request: Request, token: str) -> Response:
    ctx = get_ctx(request)
    try:
        claim = ctx.runtime.tokens.read_confirm(token)
        async with ctx.runtime.sessions() as session:
            await subscriptions.confirm(session, claim, _origin(ctx, request, "double opt-in"))
    except TokenError as exc:
        return _token_error(ctx, request, exc)
    if wants_json(request):
        return JSONResponse({"status": "confirmed"})
    return _page(ctx, request, "confirmed.html")


@router.get("/unsubscribe/{token}", response_class=HTMLResponse, **LINK_DOC)
async def unsubscribe_page(request: Request, token: str) -> Response:
    ctx = get_ctx(request)
    try:
        await _known(ctx, ctx.runtime.tokens.read_unsubscribe(token), "unsubscribe")
    except TokenError as exc:
        return _token_error(ctx, request, exc)
    return _page(ctx, request, "unsubscribe.html", token=token)


@router.post("/unsubscribe/{token}", **LINK_DOC)
async def unsubscribe(request: Request, token: str) -> Response:
    """Both the page's button and RFC 8058 one-click land here; the body is not needed."""
    ctx = get_ctx(request)
    ctype = request.headers.get("content-type", "")
    how = "one-click" if ("form" in ctype and not request.headers.get("cookie")) else "page"
    try:
        sub_id = ctx.runtime.tokens.read_unsubscribe(token)
        async with ctx.runtime.sessions() as session:
            await subscriptions.unsubscribe(session, sub_id, _origin(ctx, request, how), how)
    except TokenError as exc:
        return _token_error(ctx, request, exc)
    if wants_json(request):
        return JSONResponse({"status": "unsubscribed"})
    return _page(ctx, request, "unsubscribed.html")
