"""The sign-up form on the campaign site: CORS for its origins, refusal for the others.

``POST /subscribe`` may come from a page of an origin in ``MAILER_ALLOWED_ORIGINS``
(the site's "Get updates" box, posted by a plain form or by ``/embed.js`` with
``fetch``). Such a request gets ``Access-Control-Allow-Origin`` echoing its origin,
never ``*``, and every answer carries ``Vary: Origin`` so a cache cannot hand one
site's answer to another. A POST whose ``Origin`` names any other site is refused with
403 before anything is read: otherwise any web page could make its visitors' browsers
sign strangers up from thousands of addresses, past the per-IP limit. A POST without
an ``Origin`` (servers, curl) or with ``Origin: null`` (browsers send that for a form
on a page with ``Referrer-Policy: no-referrer``, our own pages included) is let
through: it names no site to refuse (docs/site-form.md).
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import Message, Scope, Send

from mailer.config import Settings
from mailer.config_values import web_origin

FORM_PATHS = frozenset({"/subscribe"})
PREFLIGHT_MAX_AGE_S = 600
MAX_REDIRECT = 2000


def site_origins(settings: Settings) -> frozenset[str]:
    """The origins the form may be posted from and redirect back to: the site's and ours."""
    own = web_origin(settings.base_url)
    return frozenset([*settings.allowed_origins, *([own] if own else [])])


def site_redirect(settings: Settings, value: object) -> str | None:
    """``value`` when it is an absolute URL on an allowed origin, else None (no open
    redirect: a foreign or malformed URL is ignored, not followed)."""
    if not isinstance(value, str) or not value or len(value) > MAX_REDIRECT:
        return None
    origin = web_origin(value)
    if origin is None or origin not in site_origins(settings):
        return None
    return value


def add_cors(message: Message, origin: str | None) -> None:
    """The CORS headers of an answer on a form path: the allowed ``origin`` echoed (None:
    not allowed, none given) and ``Vary: Origin``."""
    headers = MutableHeaders(scope=message)
    if origin:
        headers["access-control-allow-origin"] = origin
    current = [v.strip() for v in headers.get("vary", "").split(",") if v.strip()]
    if "origin" not in (v.lower() for v in current):
        headers["vary"] = ", ".join([*current, "Origin"])


async def check_origin(
    origins: frozenset[str], scope: Scope, send: Send
) -> tuple[bool, str | None]:
    """Before a form path's request reaches the app: (answered, the origin to echo).
    A preflight is answered here, and so is a POST from a site not allowed (403);
    otherwise the allowed origin, or None when there is none to echo."""
    headers = Headers(scope=scope)
    origin = headers.get("origin")
    allowed = origin is not None and origin.lower() in origins
    method = scope["method"]
    if method == "OPTIONS":
        await _preflight(send, origin if allowed else None)
        return True, None
    if method == "POST" and origin and origin != "null" and not allowed:
        await _refuse(send, origin, headers)
        return True, None
    return False, origin if allowed else None


async def _preflight(send: Send, origin: str | None) -> None:
    """204 with the CORS answer for an allowed origin; 403 without it for any other."""
    headers = [(b"vary", b"Origin"), (b"allow", b"GET, POST, OPTIONS")]
    if origin is not None:
        headers += [
            (b"access-control-allow-origin", origin.encode()),
            (b"access-control-allow-methods", b"POST"),
            (b"access-control-allow-headers", b"Content-Type, Accept"),
            (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_S).encode()),
        ]
    status = 204 if origin is not None else 403
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def _refuse(send: Send, origin: str, headers: Headers) -> None:
    shown = origin[:200].encode("ascii", "replace").decode()
    message = f"This form cannot be posted from {shown}: that site is not allowed."
    wants_json = "application/json" in (headers.get("accept", "") + headers.get("content-type", ""))
    if wants_json:
        body, ctype = json.dumps({"detail": message}).encode(), b"application/json"
    else:
        body, ctype = message.encode(), b"text/plain; charset=utf-8"
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [
                (b"content-type", ctype),
                (b"content-length", str(len(body)).encode()),
                (b"vary", b"Origin"),
                (b"x-content-type-options", b"nosniff"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
