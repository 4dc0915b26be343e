"""What a request handler can reach: the runtime, the queue and the page templates."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from fastapi.templating import Jinja2Templates

from mailer.render import Renderer
from mailer.runtime import Runtime
from mailer.worker import Queue


@dataclass
class AppContext:
    runtime: Runtime
    queue: Queue
    templates: Jinja2Templates
    renderer: Renderer


def get_ctx(request: Request) -> AppContext:
    ctx = request.app.state.ctx
    assert isinstance(ctx, AppContext)
    return ctx


def wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    ctype = request.headers.get("content-type", "")
    return ctype.startswith("application/json") or (
        "application/json" in accept and "text/html" not in accept
    )


def client_ip(request: Request, trusted_proxies: list[str]) -> str:
    """The visitor's address; X-Forwarded-For counts only when the peer is a trusted proxy."""
    peer = request.client.host if request.client else "unknown"
    if peer not in trusted_proxies:
        return peer
    forwarded = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",")]
    for hop in reversed([h for h in forwarded if h]):
        if hop not in trusted_proxies:
            return hop[:64]
    return peer
