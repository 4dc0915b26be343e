"""The poller against every kind of feed the site may serve, good and broken: Atom and
JSON Feed read like RSS; 304, 500, garbage, a 50 MB body, a redirect loop and a body
that never ends each leave a visible error on their feed and nothing else changes.
``mailer feeds check`` shows what would be imported without writing anything."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from html import escape
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from forkrun import run_mailer
from helpers import editor_token, settings_env, sql
from rich.console import Console
from siteserver import STATEMENT_PAGE, SiteServer, entry, poll, rss
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse

from mailer.config import FeedMode, Settings
from mailer.ops.status import collect, render
from mailer.queue import Queue
from mailer.runtime import Runtime

BROKEN = ("/error500", "/garbage", "/huge", "/loop", "/drip", "/not-json-feed")
HUGE = 50_000_000
MAILER = str(Path(sys.executable).parent / "mailer")


def atom(site: SiteServer, entries: list[dict[str, str]]) -> str:
    items = "".join(
        f"""<entry><title type="html">{escape(e["title"])}</title>
<link rel="alternate" href="{e["link"]}"/><id>{e["guid"]}</id>
<author><name>{e["author"]}</name></author><updated>2024-01-0{i + 1}T10:00:00Z</updated>
<summary>Summary only.</summary><content type="html">{escape(e["body"])}</content></entry>"""
        for i, e in enumerate(entries)
    )
    return f"""<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>Campaign</title><id>{site.url("/")}</id>
<updated>2024-01-09T10:00:00Z</updated>{items}</feed>"""


def json_feed(site: SiteServer, entries: list[dict[str, str]]) -> str:
    return json.dumps(
        {
            "version": "https://jsonfeed.org/version/1.1",
            "title": "Campaign",
            "items": [
                {"id": "no url, no title: still fine", "content_text": "Para one.\n\nPara two."},
                {"title": "no id: skipped", "content_text": "x"},
            ]
            + [
                {
                    "id": e["guid"],
                    "url": e["link"],
                    "title": e["title"],
                    "authors": [{"name": e["author"]}],
                    "content_html": e["body"],
                    "date_published": f"2024-01-0{i + 1}T10:00:00+00:00",
                }
                for i, e in enumerate(entries)
            ],
        }
    )


@pytest.fixture
async def site() -> AsyncIterator[SiteServer]:
    server = await SiteServer().start()
    yield server
    await server.stop()


@pytest.fixture
def paths() -> list[str]:
    return ["/feed"]


@pytest.fixture
def settings_overrides(site: SiteServer, paths: list[str]) -> dict[str, Any]:
    return {
        "feed_urls": [site.url(p) for p in paths],
        "feed_mode": FeedMode.hold,
        "feed_timeout_s": 6.0,  # the drip outlasts it; a sound feed under load does not
        "feed_max_bytes": 1_000_000,
    }


@pytest.mark.parametrize("kind", ["atom", "json"])
async def test_atom_and_json_feed_read_like_rss(
    app_client: httpx.AsyncClient, settings: Settings, site: SiteServer, kind: str
) -> None:
    token = await editor_token(settings)
    build, ctype = (atom, "application/atom+xml") if kind == "atom" else (json_feed, "")
    ctype = ctype or "application/feed+json"
    entries = [entry(site, 1), entry(site, 2)]
    site.serve("/feed", build(site, entries), ctype)
    [report] = await poll(app_client, token)
    assert (report["status"], report["error"]) == ("first run", None)
    assert report["entries"] == (2 if kind == "atom" else 3)  # the id-less JSON item is skipped

    entries.append(entry(site, 3, STATEMENT_PAGE))
    site.serve("/feed", build(site, entries), ctype)
    [report] = await poll(app_client, token)
    assert [n["title"] for n in report["new"]] == ["Statement number 3"]
    rows = await sql(
        settings, "SELECT title, author, url, source, body_html, body_text FROM statements"
    )
    [(title, author, url, source, body_html, body_text)] = rows
    assert (title, author, url, source) == (
        "Statement number 3",
        "Press Office",
        site.url("/statements/3"),
        "feed",
    )
    assert f'src="{site.url("/media/rally.jpg")}"' in body_html
    assert "<iframe" not in body_html and "<script" not in body_html
    assert "Second paragraph of the statement." in body_text
    # Polled again, unchanged: 304, and nothing new.
    [report] = await poll(app_client, token)
    assert report["status"] == "not modified" and report["new"] == []


def _broken_routes(site: SiteServer, sent: dict[str, int]) -> None:
    async def error500(_: Request) -> Response:
        return Response("Internal Server Error", 500)

    async def garbage(_: Request) -> Response:
        return Response(bytes(range(256)) * 40, media_type="application/rss+xml")

    async def not_json_feed(_: Request) -> Response:
        return Response('{"version": "2", "items": 7}', media_type="application/json")

    async def huge(_: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            chunk = b"<!-- " + b"x" * 65_000 + b" -->"
            while sent["huge"] < HUGE:
                sent["huge"] += len(chunk)
                yield chunk
                await asyncio.sleep(0)  # lets the server notice the client has gone

        return StreamingResponse(body(), media_type="application/rss+xml")

    async def loop(_: Request) -> Response:
        return RedirectResponse(site.url("/loop"), 302)

    async def drip(_: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(40):  # one byte every 0.5 s: each read is quick, the whole is not
                yield b" "
                await asyncio.sleep(0.5)

        return StreamingResponse(body(), media_type="application/rss+xml")

    for path, handler in (
        ("/error500", error500),
        ("/garbage", garbage),
        ("/not-json-feed", not_json_feed),
        ("/huge", huge),
        ("/loop", loop),
        ("/drip", drip),
    ):
        site.route(path, handler)


@pytest.mark.parametrize("paths", [["/feed", *BROKEN]])
async def test_broken_feeds_show_their_error_and_leave_the_good_one_alone(
    app_client: httpx.AsyncClient, settings: Settings, site: SiteServer
) -> None:
    token = await editor_token(settings)
    sent = {"huge": 0}
    _broken_routes(site, sent)
    site.serve("/feed", rss([entry(site, 1)]), "application/rss+xml")

    reports = {r["url"].removeprefix(site.origin): r for r in await poll(app_client, token)}
    assert reports["/feed"]["status"] == "first run"
    errors = {path: reports[path]["error"] for path in BROKEN}
    assert all(reports[path]["status"] == "failed" for path in BROKEN)
    assert errors["/error500"] == "HTTP 500 Internal Server Error"
    assert errors["/garbage"].startswith("not an RSS, Atom, RDF or JSON feed")
    assert errors["/not-json-feed"].startswith("not a JSON Feed: version")
    assert errors["/huge"] == "body is over the 1000000-byte cap"
    assert sent["huge"] < HUGE // 4, "the 50 MB body was read on past the cap"
    assert errors["/loop"] == "more than 5 redirects (a redirect loop?)"
    assert errors["/drip"] == "no complete answer within 6 s"

    site.serve("/feed", rss([entry(site, 1), entry(site, 2)]), "application/rss+xml")
    reports = {r["url"].removeprefix(site.origin): r for r in await poll(app_client, token)}
    assert [n["title"] for n in reports["/feed"]["new"]] == ["Statement number 2"]
    assert reports["/feed"]["new"][0]["action"] == "held"
    assert {reports[p]["error"] for p in BROKEN} == set(errors.values())
    rows = dict(await sql(settings, "SELECT url, last_error FROM feeds"))
    assert rows[site.url("/feed")] is None
    assert {p: rows[site.url(p)] for p in BROKEN} == errors

    # Visible to ops: /metrics and `mailer status`.
    metrics = (await app_client.get("/metrics")).text
    assert f'mailer_feed_up{{feed="{site.url("/feed")}"}} 1.0' in metrics
    for path in BROKEN:
        assert f'mailer_feed_up{{feed="{site.url(path)}"}} 0.0' in metrics
    assert f'mailer_feed_last_success_timestamp_seconds{{feed="{site.url("/feed")}"}}' in metrics
    runtime, queue = Runtime.create(settings), await Queue.connect(settings)
    try:
        out = StringIO()
        Console(file=out, width=250).print(render(await collect(runtime, queue)))
    finally:
        await queue.close()
        await runtime.close()
    table = out.getvalue()
    assert "Site feeds" in table and "HTTP 500 Internal Server Error" in table
    assert table.count("failing") == len(BROKEN)


async def test_feeds_check_prints_what_would_be_imported_and_writes_nothing(
    app_client: httpx.AsyncClient, settings: Settings, site: SiteServer
) -> None:
    site.serve("/feed", rss([entry(site, 1), entry(site, 2, STATEMENT_PAGE)]), "text/xml")

    async def check(url: str) -> tuple[int, str, str]:
        env = settings_env(settings)
        done = await asyncio.to_thread(run_mailer, ["feeds", "check", url], env=env)
        return done.returncode, done.stdout, done.stderr

    code, out, err = await check(site.url("/feed"))
    assert code == 0, err
    assert "rss20 feed, 2 entries" in out
    assert "first poll records these entries as seen and mails none" in out
    assert "Statement number 2" in out and "by Press Office" in out
    assert "text: The campaign answered today." in out
    assert "widgets.js" not in out
    for table in ("feeds", "feed_entries", "statements"):
        assert await sql(settings, f"SELECT count(*) FROM {table}") == [(0,)]  # noqa: S608

    token = await editor_token(settings)
    await poll(app_client, token)
    site.serve("/feed", rss([entry(site, n) for n in (1, 2, 3)]), "text/xml")
    code, out, _ = await check(site.url("/feed"))
    assert "1 would become statements" in out and "[NEW ] Statement number 3" in out
    assert "[seen] Statement number 1" in out
    assert await sql(settings, "SELECT count(*) FROM statements") == [(0,)]

    code, _, err = await check(site.url("/error500"))
    assert code == 1 and err.strip() == f"error: {site.url('/error500')}: HTTP 404 Not Found"


async def test_editors_add_takes_the_address_for_notices(settings: Settings) -> None:
    async def mailer(*args: str) -> tuple[int, str, str]:
        env = settings_env(settings)
        done = await asyncio.to_thread(run_mailer, list(args), env=env)
        return done.returncode, done.stdout, done.stderr

    code, out, err = await mailer("editors", "add", "Desk", "--email", "Desk@Campaign.Example")
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("mlr_")
    code, _, err = await mailer("editors", "add", "Other", "--email", "not-an-address")
    assert code == 1 and err.startswith("error: email: ") and len(err.splitlines()) == 1
    rows = await sql(settings, "SELECT name, email FROM editors ORDER BY id")
    assert rows == [("Desk", "desk@campaign.example")]
