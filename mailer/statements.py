"""Statements: Markdown in, sanitized HTML and readable plain text out; the records.

Markdown is rendered and sanitized once, when an editor saves, so every send
reuses the stored ``body_html``/``body_text``. Raw HTML is allowed in the source
(editors paste embeds and tables) but is always sanitized afterwards: mail
clients run no scripts, yet webmail and the preview page are browsers.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import nh3
from markdown_it import MarkdownIt
from pydantic import BaseModel, ConfigDict, field_validator
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mailer.models import Statement

MAX_TITLE = 300
MAX_BODY = 200_000
MAX_AUTHOR = 200
MAX_URL = 2000

_md = MarkdownIt("commonmark", {"html": True, "linkify": False, "typographer": False}).enable(
    ["table", "strikethrough"]
)

_ATTRIBUTES: dict[str, set[str]] = {
    **{tag: set(attrs) for tag, attrs in nh3.ALLOWED_ATTRIBUTES.items()},
    "*": {"title"},
}
_ATTRIBUTES["th"] = _ATTRIBUTES["th"] | {"style"}  # markdown-it writes table alignment as style
_ATTRIBUTES["td"] = _ATTRIBUTES["td"] | {"style"}

# The one allow-list for statement HTML, Markdown's and the site's (mailer/cms_html.py).
CLEANER_OPTIONS: dict[str, Any] = {
    "tags": set(nh3.ALLOWED_TAGS),
    "clean_content_tags": {"script", "style", "iframe", "object", "embed", "noscript", "template"},
    "attributes": _ATTRIBUTES,
    "url_schemes": {"http", "https", "mailto", "tel"},
    "link_rel": "noopener",
    "filter_style_properties": {"text-align"},
}
_cleaner = nh3.Cleaner(**CLEANER_OPTIONS)


def sanitize_html(html: str) -> str:
    """Allow-list sanitizing: unknown tags, event handlers and script URLs never survive."""
    return str(_cleaner.clean(html))


def render_markdown(md: str) -> tuple[str, str]:
    """Return (sanitized HTML, plain text); the text is derived from the sanitized HTML
    so it can never show something the HTML version dropped."""
    html = sanitize_html(_md.render(md))
    return html, html_to_text(html)


# HTML → plain text ----------------------------------------------------------------

_BR = "\x00"  # a line break inside a block; NUL never survives markdown-it or nh3
_BLOCKS = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "table", "figure", "figcaption"}
_BLOCKS |= {"dl", "dt", "dd", "details", "summary", "header", "footer", "article", "aside"}


class _TextWriter(HTMLParser):
    """Plain text a reader can follow: paragraphs, bullets, quotes, "text (url)" links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, str]] = []  # (text, kind): "li"/"row" runs stay tight
        self.buf: list[str] = []
        self.lists: list[int] = []  # -1 for a bullet list, else the next number
        self.list_runs = 0  # top-level lists seen: a new one gets a blank line before it
        self.marker: str | None = None  # the bullet waiting for the next block of an <li>
        self.quote = 0
        self.pre = 0
        self.heading = ""
        self.links: list[tuple[str, int]] = []
        self.cells: list[str] = []

    def _inline(self) -> str:
        text = "".join(self.buf)
        self.buf = []
        if self.pre:
            return text.strip("\n")
        return "\n".join(" ".join(line.split()) for line in text.split(_BR)).strip()

    def flush(self) -> None:
        text = self._inline()
        if not text:
            return
        if self.heading:
            text += "\n" + ("=" if self.heading == "h1" else "-") * min(len(text), 72)
        indent = "  " * max(len(self.lists) - 1, 0)
        lines = text.split("\n")
        if self.pre:
            lines = ["    " + line for line in lines]
        if self.lists:
            first = self.marker or "  "
            lines = [indent + first + lines[0]] + [indent + "  " + ln for ln in lines[1:]]
            self.marker = None
        prefix = "> " * self.quote
        kind = f"li{self.list_runs}" if self.lists else ""
        self.blocks.append(("\n".join(prefix + ln for ln in lines), kind))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCKS or tag in ("ul", "ol", "li", "blockquote", "pre", "tr", "hr"):
            self.flush()
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.heading = tag
        elif tag in ("ul", "ol"):
            start = dict(attrs).get("start") or "1"
            self.list_runs += not self.lists
            self.lists.append(-1 if tag == "ul" else int(start) if start.isdigit() else 1)
        elif tag == "li" and self.lists:
            n = self.lists[-1]
            self.marker = "- " if n < 0 else f"{n}. "
            if n >= 0:
                self.lists[-1] = n + 1
        elif tag == "blockquote":
            self.quote += 1
        elif tag == "pre":
            self.pre += 1
        elif tag == "br":
            self.buf.append(_BR)
        elif tag == "hr":
            self.blocks.append(("-" * 40, ""))
        elif tag == "a":
            self.links.append((dict(attrs).get("href") or "", len(self.buf)))
        elif tag == "img":
            alt = (dict(attrs).get("alt") or "").strip()
            if alt:
                self.buf.append(f"[{alt}]")
        elif tag in ("td", "th"):
            self.buf = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self.links:
            href, start = self.links.pop()
            label = " ".join("".join(self.buf[start:]).split())
            if href and not href.startswith("#") and href not in (label, f"mailto:{label}"):
                self.buf.append(f" ({href})" if label else href)
        elif tag in ("td", "th"):
            self.cells.append(" ".join(self._inline().split()))
        elif tag == "tr":
            if any(self.cells):
                self.blocks.append((" | ".join(self.cells), "row"))
            self.cells = []
        elif tag in _BLOCKS or tag in ("li", "blockquote", "pre", "ul", "ol"):
            self.flush()
            if tag.startswith("h") and tag[1:].isdigit():
                self.heading = ""
            elif tag in ("ul", "ol") and self.lists:
                self.lists.pop()
            elif tag == "blockquote":
                self.quote = max(self.quote - 1, 0)
            elif tag == "pre":
                self.pre = max(self.pre - 1, 0)

    def handle_data(self, data: str) -> None:
        self.buf.append(data)


def html_to_text(html: str) -> str:
    writer = _TextWriter()
    writer.feed(html)
    writer.close()
    writer.flush()
    out: list[str] = []
    previous = None
    for text, kind in writer.blocks:
        if out:
            out.append("\n" if kind and kind == previous else "\n\n")
        out.append(text)
        previous = kind
    return "".join(out).replace(_BR, "\n") + ("\n" if out else "")


# Input: the API body and Markdown files -------------------------------------------


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in text)


def _one_line(value: str, field: str, max_len: int) -> str:
    if len(value) > max_len:
        raise ValueError(f"{field} must be at most {max_len} characters (got {len(value)})")
    if _has_control(value):
        raise ValueError(f"{field} must be a single line without control characters")
    return value


class StatementIn(BaseModel):
    """A statement as an editor submits it (the JSON body of ``POST /api/statements``)."""

    model_config = ConfigDict(extra="forbid")

    title: str
    body_markdown: str
    author: str | None = None
    url: str | None = None

    @field_validator("title")
    @classmethod
    def _title(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("title must not be empty")
        return _one_line(value, "title", MAX_TITLE)

    @field_validator("body_markdown")
    @classmethod
    def _body(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("body_markdown must not be empty")
        if len(value) > MAX_BODY:
            raise ValueError(f"body_markdown must be at most {MAX_BODY} characters")
        if "\x00" in value:  # PostgreSQL text cannot store NUL
            raise ValueError("body_markdown must not contain NUL characters")
        return value

    @field_validator("author")
    @classmethod
    def _author(cls, value: str | None) -> str | None:
        value = (value or "").strip()
        return _one_line(value, "author", MAX_AUTHOR) if value else None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        value = (value or "").strip()
        if not value:
            return None
        _one_line(value, "url", MAX_URL)
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or " " in value:
            raise ValueError("url must be an absolute http:// or https:// address")
        return value


@dataclass(frozen=True)
class StatementDraft:
    """A statement read from a Markdown file, not yet validated."""

    title: str
    body_markdown: str
    author: str | None = None
    url: str | None = None

    def validate(self) -> StatementIn:
        """Raise pydantic.ValidationError with the same messages as the API."""
        return StatementIn(
            title=self.title, body_markdown=self.body_markdown, author=self.author, url=self.url
        )


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_H1 = re.compile(r"^ {0,3}# +(.*?)(?: +#+)? *$")


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def parse_markdown_file(text: str) -> StatementDraft:
    """Split ``--- key: value ---`` front matter (title, author, url; other keys such
    as Hugo's ``date`` are ignored) from the body; without a title there, the first
    ``# `` heading is the title and leaves the body, so it is not shown twice."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    meta: dict[str, str] = {}
    lines = text.split("\n")
    if lines and lines[0].strip() == "---":
        for end in range(1, len(lines)):
            if lines[end].strip() in ("---", "..."):
                break
        else:
            raise ValueError("front matter starts with '---' but has no closing '---'")
        for number, line in enumerate(lines[1:end], start=2):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"front matter line {number}: expected 'key: value'")
            meta[key.strip().lower()] = _unquote(value)
        lines = lines[end + 1 :]
    title = meta.get("title", "").strip()
    if not title:
        fence: str | None = None
        for index, line in enumerate(lines):
            match = _FENCE.match(line)
            if match and (fence is None or match.group(1).startswith(fence)):
                fence = None if fence else match.group(1)[0] * 3
            elif fence is None and (h1 := _H1.match(line)):
                title = h1.group(1).strip()
                del lines[index]
                break
    if not title:
        raise ValueError("no title: add front matter 'title: ...' or a '# Heading' line")
    return StatementDraft(
        title=title,
        body_markdown="\n".join(lines).strip("\n") + "\n",
        author=meta.get("author") or None,
        url=meta.get("url") or None,
    )


# Records --------------------------------------------------------------------------


def _apply(statement: Statement, data: StatementIn) -> None:
    html, text = render_markdown(data.body_markdown)
    statement.title = data.title
    statement.author = data.author
    statement.url = data.url
    statement.body_markdown = data.body_markdown
    statement.body_html = html
    statement.body_text = text


async def create_statement(
    session: AsyncSession, data: StatementIn, editor_id: int | None
) -> Statement:
    """Render and store; committed before returning, like the other service functions."""
    statement = Statement(editor_id=editor_id)
    _apply(statement, data)
    session.add(statement)
    await session.commit()
    return statement


async def update_statement(
    session: AsyncSession, statement_id: int, data: StatementIn, editor_id: int | None = None
) -> Statement | None:
    """Replace the content (re-rendered); None when there is no such statement."""
    statement = await session.get(Statement, statement_id, with_for_update=True)
    if statement is None:
        return None
    _apply(statement, data)
    if editor_id is not None:
        statement.editor_id = editor_id
    await session.commit()
    return statement


async def get_statement(session: AsyncSession, statement_id: int) -> Statement | None:
    return await session.get(Statement, statement_id)


async def list_statements(
    session: AsyncSession, limit: int = 50, offset: int = 0
) -> list[Statement]:
    """Newest first; the limit is clamped so a bad query string cannot dump the table."""
    limit = min(max(limit, 1), 500)
    query = select(Statement).order_by(Statement.id.desc()).limit(limit).offset(max(offset, 0))
    return list((await session.scalars(query)).all())
