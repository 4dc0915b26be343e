"""Pure ASGI middleware that every request passes: form CORS, body-size limit, security headers.

Pure ASGI rather than ``@app.middleware("http")`` because the limit must count the
bytes as they arrive: a chunked request has no Content-Length to check up front.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailer.web.cors import FORM_PATHS, add_cors, check_origin


def csp(*, frame_ancestors: str = "'none'") -> str:
    """The pages' policy: scripts and styles from our own files only, never inline."""
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"frame-ancestors {frame_ancestors}; form-action 'self'; base-uri 'none'; "
        "object-src 'none'"
    )


# For email HTML served on its own (previews): the sandbox keeps it from running scripts,
# submitting forms or reaching our origin; inline styles are what make it look like the
# mail. The same as the admin preview's PREVIEW_HEADERS (mailer/web/admin.py).
SANDBOX_HEADERS = {
    "Content-Security-Policy": "sandbox; default-src 'none'; style-src 'unsafe-inline'; "
    "img-src data: https:; frame-ancestors 'self'",
    "X-Frame-Options": "SAMEORIGIN",
    "Cache-Control": "no-store",
}


def security_headers(base_url: str) -> dict[str, str]:
    headers = {
        "Content-Security-Policy": csp(),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",  # our URLs carry tokens
        "X-Frame-Options": "DENY",
        "Cross-Origin-Opener-Policy": "same-origin",
    }
    if urlsplit(base_url).scheme == "https":
        headers["Strict-Transport-Security"] = "max-age=31536000"
    return headers


# After a 413, read on for at most this many times the limit or this long, whichever
# comes first. Time is the real bound: a client on the same network sends 8 MB in
# milliseconds, so a small byte budget closed the line while the 413 was still unread,
# the kernel reset it, and the client saw no answer at all (nginx's lingering close).
DRAIN_FACTOR = 64
DRAIN_SECONDS = 2.0


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes the limit, so the app stops reading."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class Guards:
    """The one middleware: the sign-up form's CORS, the body-size limit, security headers.

    One layer instead of three (each wrapped ``send`` once more on every request):

    - On the form's paths (``mailer/web/cors.py``) a preflight is answered and a POST
      from a site not allowed is refused before anything else, as they were when CORS
      was the outermost layer; every other answer there gets the CORS headers.
    - A body over ``limit`` bytes gets 413, declared or not. A Content-Length over the
      limit is refused before anything is read. Otherwise the bytes are counted as the
      app receives them; past the limit ``receive`` raises, and whatever the app makes of
      that, the client gets the 413 and the app's own answer is dropped. Nothing the app
      does after a failed read (it cannot have the whole body) can reach SQL first:
      handlers read before writing.
    - Every answer that does not set them itself (sandboxed previews) gets the security
      headers, the 413 included.
    """

    def __init__(
        self, app: ASGIApp, *, limit: int, headers: dict[str, str], origins: Iterable[str]
    ) -> None:
        self.app = app
        self.limit = limit
        self.headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
        ]
        self.origins = frozenset(origins)

    def _decorate(self, message: Message, form: bool, origin: str | None) -> None:
        """Add the security headers the answer lacks (and on a form path, the CORS ones)."""
        headers = list(message.get("headers", ()))
        present = {name.lower() for name, _ in headers}
        headers += [item for item in self.headers if item[0] not in present]
        message["headers"] = headers
        if form:
            add_cors(message, origin)

    async def _refuse(self, send: Send, receive: Receive) -> None:
        """Answer 413, then read on for a moment before the answer is complete.

        The answer goes out whole at once (its Content-Length is set), but the ASGI
        response is completed only after ``_drain``: uvicorn closes the connection as soon
        as a ``Connection: close`` response is complete, and from then on ``receive``
        only says the client left, so a drain after it reads nothing.
        """
        body = json.dumps({"detail": f"request body larger than {self.limit} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": True})
        await self._drain(receive)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        form = scope["path"] in FORM_PATHS
        origin = None
        if form:
            answered, origin = await check_origin(self.origins, scope, send)
            if answered:
                return

        async def decorated_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._decorate(message, form, origin)
            await send(message)

        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(decorated_send, receive)
            return

        received = 0
        over = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, over
            if over:
                raise BodyTooLarge(self.limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True
                    raise BodyTooLarge(self.limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to a body it could not read: the 413 replaces it
            if message["type"] == "http.response.start":
                started = True
                self._decorate(message, form, origin)
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            await self._refuse(decorated_send, receive)

    async def _drain(self, receive: Receive) -> None:
        """Read (and drop) a bounded part of the rest of the upload, the 413 already sent.

        The server closes the connection after a 413 with the upload unread; the kernel
        then resets it, and a client still sending can lose the 413 it has not read yet.
        Reading on for a moment lets the answer get there first. Proved by
        ``test_a_client_that_sends_its_whole_upload_first_still_reads_the_413``.
        """
        budget = DRAIN_FACTOR * self.limit
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_SECONDS
        while budget > 0 and loop.time() < deadline:
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return
