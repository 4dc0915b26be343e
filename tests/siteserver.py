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
from html import escape
from typing import Any

import httpx
import uvicorn
from helpers import auth
from smtpserver import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mailer.config import Settings

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


STATEMENT_PAGE = """
<p>The campaign answered today.
<a href="/statements/earlier-one">Read our earlier statement</a>.</p>
<figure><img src="/media/rally.jpg" alt="Supporters at the rally" width="1200" height="800">
<figcaption>Supporters at the rally.</figcaption></figure>
<p onclick="track('second')">Second paragraph of the statement.</p>
<blockquote class="twitter-tweet" data-dnt="true"><p lang="en" dir="ltr">We will not back down.
<a href="https://t.co/x1">pic.twitter.com/x1</a></p>&mdash; Campaign (@campaign)
<a href="https://twitter.com/campaign/status/1790000000000000000?ref_src=twsrc%5Etfw"
>May 13, 2024</a>
</blockquote>
<script async src="https://platform.twitter.com/widgets.js" charset="utf-8"></script>
<iframe width="560" height="315" src="https://www.youtube.com/embed/abc123XYZ"
 title="YouTube video player" frameborder="0" allowfullscreen></iframe>
<p>Third paragraph, the last one.</p>
"""


def entry(site: SiteServer, n: int, body: str = "", guid: str | None = None) -> dict[str, str]:
    return {
        "guid": guid or f"tag:campaign.example,2024:statement-{n}",
        "link": site.url(f"/statements/{n}"),
        "title": f"Statement number {n}",
        "author": "Press Office",
        "body": body or f"<p>Body of statement {n}.</p>",
        "date": f"Mon, 0{n} Jan 2024 10:00:00 GMT",
    }


def rss(entries: list[dict[str, str]]) -> str:
    items = "".join(
        f"""<item><title>{escape(e["title"])}</title><link>{e["link"]}</link>
<guid isPermaLink="false">{e["guid"]}</guid><dc:creator>{e["author"]}</dc:creator>
<pubDate>{e["date"]}</pubDate><description>Summary only.</description>
<content:encoded><![CDATA[{e["body"]}]]></content:encoded></item>"""
        for e in entries[::-1]  # newest first, as feeds are
    )
    return f"""<?xml version="1.0" encoding="utf-8"?>
<rss version="2.0" xmlns:content="http://purl.org/rss/1.0/modules/content/"
 xmlns:dc="http://purl.org/dc/elements/1.1/"><channel><title>Campaign</title>
<link>https://campaign.example/</link><description>Statements</description>{items}
</channel></rss>"""


async def poll(client: httpx.AsyncClient, token: str) -> list[dict[str, Any]]:
    r = await client.post("/api/feeds/poll", headers=auth(token))
    assert r.status_code == 200, r.text
    return list(r.json()["feeds"])


def no_feeds(settings: Settings) -> Settings:
    """The worker's settings for tests that poll through the API: no cron poll racing it."""
    return settings.model_copy(update={"feed_urls": []})
