"""A stand-in for the campaign site: a real HTTP server (uvicorn) in the test's event loop.

Its pages and feeds are set per test (``serve`` for a document with an ETag and
Last-Modified, answered 304 when the client has it; ``route`` for any handler), and it
records every request, so a test can check what the poller asked for.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate

import uvicorn
from smtpserver import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    status: int


@dataclass
class SiteServer:
    port: int = field(default_factory=free_port)
    handlers: dict[str, Handler] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.origin + path

    def route(self, path: str, handler: Handler) -> None:
        self.handlers[path] = handler

    def serve(self, path: str, body: str | bytes, content_type: str) -> None:
        """A document with validators; a conditional GET that matches gets 304."""
        data = body.encode() if isinstance(body, str) else body
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        modified = formatdate(usegmt=True)

        async def handler(request: Request) -> Response:
            validators = {"ETag": etag, "Last-Modified": modified}
            if request.headers.get("if-none-match") == etag:
                return Response(status_code=304, headers=validators)
            return Response(data, media_type=content_type, headers=validators)

        self.route(path, handler)

    def hits_of(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    async def _dispatch(self, request: Request) -> Response:
        path = request.url.path
        handler = self.handlers.get(path)
        response = await handler(request) if handler else Response("not found", 404)
        self.hits.append(Hit(path, dict(request.headers), response.status_code))
        return response

    async def start(self) -> SiteServer:
        app = Starlette(routes=[Route("/{path:path}", self._dispatch, methods=["GET", "POST"])])
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_config=None, lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        for _ in range(200):
            if self._server.started:
                return self
            await asyncio.sleep(0.02)
        raise AssertionError("the site server did not start")

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            self._server.force_exit = True
            await self._task
