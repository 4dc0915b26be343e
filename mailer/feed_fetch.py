"""Fetching and reading one of the site's feeds: hostile input, handled with limits.

A feed is fetched with a conditional GET (the ETag and Last-Modified of the last good
answer), within ``MAILER_FEED_TIMEOUT_S`` for the whole exchange, redirects included
(at most ``MAX_REDIRECTS``), reading at most ``MAILER_FEED_MAX_BYTES`` of body, counted
after decompression and checked while streaming, so a huge or endless body costs no
more than the cap. RSS 2.0, Atom and RDF are read by feedparser, which knows their
quirks; JSON Feed (which feedparser does not read) is validated here. Every failure is
a ``FeedError`` whose message is what ops see (docs/feeds.md).
"""

from __future__ import annotations

import asyncio
import calendar
import html
import json
import unicodedata
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import feedparser  # type: ignore[import-untyped]
import httpx
import nh3
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from mailer.config import Settings
from mailer.statements import MAX_AUTHOR, MAX_TITLE, MAX_URL

MAX_REDIRECTS = 5
MAX_ENTRIES = 500  # entries read per poll: a feed lists its newest first
MAX_BODY = 200_000  # characters of one entry's body
MAX_KEY = 10_000  # characters of an id kept (it is matched by its hash)


class FeedError(Exception):
    """A feed could not be fetched or read; the message says why, in one line."""


@dataclass(frozen=True)
class FeedItem:
    """One entry, whatever the format."""

    key: str  # guid / Atom id / JSON Feed id; else the link
    link: str | None  # absolute http(s)
    title: str
    author: str | None
    html: str  # the body as HTML (content:encoded, Atom content, summary, content_html…)
    published: float | None  # seconds since the epoch, when the feed says


@dataclass(frozen=True)
class Fetched:
    """A fetch's outcome: ``items`` is None when the feed answered 304 Not Modified."""

    url: str  # where the body came from, after redirects: the base for relative links
    items: list[FeedItem] | None
    kind: str = ""
    etag: str | None = None
    last_modified: str | None = None


def make_client(settings: Settings) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        timeout=httpx.Timeout(settings.feed_timeout_s),
        headers={
            "User-Agent": f"mailer-feed-poller (+{settings.base_url})",
            "Accept": "application/rss+xml, application/atom+xml, application/feed+json, "
            "application/xml;q=0.9, text/xml;q=0.9, */*;q=0.5",
        },
    )


async def fetch(
    client: httpx.AsyncClient,
    url: str,
    *,
    etag: str | None,
    last_modified: str | None,
    timeout_s: float,
    max_bytes: int,
) -> Fetched:
    """GET the feed within the limits and parse it; raise FeedError on any failure."""
    headers = {}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("GET", url, headers=headers) as response:
                final = str(response.url)
                if response.status_code == 304:
                    return Fetched(final, None, etag=etag, last_modified=last_modified)
                if response.status_code != 200:
                    raise FeedError(f"HTTP {response.status_code} {response.reason_phrase}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise FeedError(f"body of {declared} bytes is over the {max_bytes}-byte cap")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise FeedError(f"body is over the {max_bytes}-byte cap")
                content_type = response.headers.get("content-type", "")
                new_etag = response.headers.get("etag")
                new_modified = response.headers.get("last-modified")
    except TimeoutError:
        raise FeedError(f"no complete answer within {timeout_s:g} s") from None
    except httpx.TooManyRedirects:
        raise FeedError(f"more than {MAX_REDIRECTS} redirects (a redirect loop?)") from None
    except httpx.HTTPError as exc:
        raise FeedError(f"cannot fetch: {type(exc).__name__}: {exc}".strip(": ")) from None
    # feedparser is pure Python (about 1 s for 500 entries on a busy machine): in a thread,
    # so a worker's event loop keeps serving its other jobs meanwhile.
    kind, items = await asyncio.to_thread(parse, bytes(body), content_type, final)
    return Fetched(final, items, kind, _header(new_etag, 500), _header(new_modified, 100))


def _header(value: str | None, limit: int) -> str | None:
    return value if value and len(value) <= limit and value.isprintable() else None


# Parsing --------------------------------------------------------------------------


def parse(body: bytes, content_type: str, url: str) -> tuple[str, list[FeedItem]]:
    """(format, entries) of a feed body; FeedError when it is no feed at all."""
    if "json" in content_type.lower() or body.lstrip()[:1] == b"{":
        return "json", _json_feed(body, url)
    parsed = feedparser.parse(
        body,
        response_headers={"content-type": content_type or "application/xml"},
        sanitize_html=False,  # cms_html sanitises, after turning embeds into links
        resolve_relative_uris=False,  # cms_html resolves against each entry's link
    )
    if not parsed.get("version"):
        reason = parsed.get("bozo_exception")
        detail = f": {str(reason).splitlines()[0][:200]}" if reason else ""
        raise FeedError(f"not an RSS, Atom, RDF or JSON feed{detail}")
    items = []
    for entry in parsed.entries[:MAX_ENTRIES]:
        item = _feedparser_item(entry, url)
        if item is not None:
            items.append(item)
    return str(parsed.version), items


def _feedparser_item(entry: Any, base: str) -> FeedItem | None:
    link = _link(entry.get("link"), base)
    body = ""
    for content in entry.get("content") or []:
        value = content.get("value") or ""
        if value.strip():
            plain = content.get("type", "text/html") == "text/plain"
            body = f"<p>{html.escape(value)}</p>" if plain else value
            break
    body = body or entry.get("summary") or ""
    author = entry.get("author") or next(
        (a.get("name") for a in entry.get("authors") or [] if a.get("name")), None
    )
    stamp = entry.get("published_parsed") or entry.get("updated_parsed")
    return _item(
        key=entry.get("id") or link,
        link=link,
        title=entry.get("title"),
        author=author,
        body=body,
        published=float(calendar.timegm(stamp)) if stamp else None,
    )


class _JsonAuthor(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str | None = None


class _JsonItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    url: str | None = None
    title: str | None = None
    content_html: str | None = None
    content_text: str | None = None
    summary: str | None = None
    author: _JsonAuthor | None = None  # JSON Feed 1.0
    authors: list[_JsonAuthor] | None = None  # 1.1
    date_published: str | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: object) -> object:
        # 1.0 feeds in the wild use numbers; the spec says "string", so make it one
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class _JsonFeed(BaseModel):
    model_config = ConfigDict(extra="ignore")
    version: str
    items: list[dict[str, Any]]

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not value.startswith("https://jsonfeed.org/version/"):
            raise ValueError("is not https://jsonfeed.org/version/1 or 1.1")
        return value


def _json_feed(body: bytes, base: str) -> list[FeedItem]:
    try:
        feed = _JsonFeed.model_validate(json.loads(body))
    except (ValueError, RecursionError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        where = ".".join(str(p) for p in first["loc"]) if first else ""
        why = f"{where}: {first['msg']}" if first else "is not valid JSON"
        raise FeedError(f"not a JSON Feed: {why}") from None
    from mailer.cms_html import text_to_html

    items = []
    for raw in feed.items[:MAX_ENTRIES]:
        try:
            entry = _JsonItem.model_validate(raw)
        except ValidationError:
            continue  # one bad item (no id) does not spoil the others
        link = _link(entry.url, base)
        names = [a.name for a in (entry.authors or []) + [entry.author] if a and a.name]
        content = entry.content_html or (
            text_to_html(entry.content_text) if entry.content_text else entry.summary or ""
        )
        item = _item(
            key=entry.id or link,
            link=link,
            title=entry.title,
            author=names[0] if names else None,
            body=content,
            published=_iso_time(entry.date_published),
        )
        if item is not None:
            items.append(item)
    return items


def _iso_time(value: str | None) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(value).timestamp() if value else None
    except ValueError:
        return None


def _link(value: object, base: str) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        url = urljoin(base, value.strip())
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > MAX_URL:
        return None
    if any(ch.isspace() or unicodedata.category(ch) == "Cc" for ch in url):
        return None
    return url


def one_line(value: object, limit: int) -> str:
    """Text for a title or byline: tags and control characters gone, one line, bounded."""
    if not isinstance(value, str):
        return ""
    text = html.unescape(nh3.clean(value, tags=set())) if "<" in value else value
    text = "".join(" " if unicodedata.category(ch)[0] in "CZ" else ch for ch in text)
    return " ".join(text.split())[:limit].strip()


def _item(
    *,
    key: object,
    link: str | None,
    title: object,
    author: object,
    body: str,
    published: float | None,
) -> FeedItem | None:
    if not isinstance(key, str) or not key.strip():
        return None  # neither an id nor a link: nothing to recognise it by next time
    name = one_line(title, MAX_TITLE) or (link or "A new statement on the site")[:MAX_TITLE]
    return FeedItem(
        key=key.replace("\x00", "").strip()[:MAX_KEY],
        link=link,
        title=name,
        author=one_line(author, MAX_AUTHOR) or None,
        html=body[:MAX_BODY].replace("\x00", ""),
        published=published,
    )
