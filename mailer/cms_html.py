"""HTML from the site's CMS (a feed entry's body) made fit for email.

A statement page carries things no mail client shows: embedded tweets (a blockquote
plus widgets.js), YouTube and Vimeo iframes, Instagram and other script-driven widgets,
lazy-loaded images, relative links. This module rewrites those first, then sanitises
with the very allow-list Markdown statements use (``statements.CLEANER_OPTIONS``), and
derives the plain-text part from the result with ``statements.html_to_text``: one path
for both kinds of statement, so nothing the HTML drops can reappear in the text.

What the rewrite does (docs/feeds.md):
- an embed becomes a plain link to the original ("Watch the video on YouTube"); a
  quoted embed (a tweet) keeps its text as a quotation above that link;
- relative ``href``/``src`` become absolute against the entry's link, so they point at
  the site; whatever cannot be made absolute is dropped by the sanitiser;
- an image keeps its alt text, its lazy-load source (``data-src``) is used, its width is
  capped at ``MAX_IMAGE_WIDTH`` and its height dropped (the email CSS scales it);
- elements the site itself hides (``hidden``, ``display:none``) stay hidden: gone.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import parse_qs, urljoin, urlsplit

import nh3

from mailer.statements import CLEANER_OPTIONS, html_to_text

MAX_IMAGE_WIDTH = 600  # the email body's width (templates/email/base.html)
MAX_INPUT = 2_000_000  # characters of CMS HTML read; a statement page is far smaller

_VOID = {"area", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
_DROP = {"script", "style", "template", "noscript", "head", "title", "svg", "math", "form"}
_MEDIA = {"iframe", "video", "audio", "object"}
# Blockquotes (and divs) that scripts turn into widgets: tweets, Instagram, TikTok…
_EMBED_CLASSES = re.compile(
    r"\b(twitter-tweet|twitter-video|instagram-media|tiktok-embed|bluesky-embed|"
    r"threads-embed|reddit-card|reddit-embed-bq|fb-post|fb-video|fb-xfbml-parse-ignore|"
    r"mastodon-embed|imgur-embed-pub)\b"
)
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.IGNORECASE)
_WHERE = (
    ("youtube.com", "Watch the video on YouTube"),
    ("youtube-nocookie.com", "Watch the video on YouTube"),
    ("youtu.be", "Watch the video on YouTube"),
    ("vimeo.com", "Watch the video on Vimeo"),
    ("twitter.com", "View the post on X"),
    ("x.com", "View the post on X"),
    ("instagram.com", "View the post on Instagram"),
    ("facebook.com", "View the post on Facebook"),
    ("tiktok.com", "Watch the video on TikTok"),
    ("bsky.app", "View the post on Bluesky"),
    ("threads.net", "View the post on Threads"),
    ("spotify.com", "Listen on Spotify"),
    ("soundcloud.com", "Listen on SoundCloud"),
)


def _absolute(url: str | None, base: str | None) -> str | None:
    """An http(s) URL, resolved against ``base``; None for anything else (javascript:,
    data:, a relative URL without a base)."""
    url = (url or "").strip()
    if not url:
        return None
    if base:
        try:
            url = urljoin(base, url)
        except ValueError:
            return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return url


def original_of(url: str) -> str:
    """The page a player iframe shows: a YouTube or Vimeo watch page, else the URL itself."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().removeprefix("www.")
    segments = [s for s in parts.path.split("/") if s]
    if host in ("youtube.com", "youtube-nocookie.com", "m.youtube.com"):
        if len(segments) >= 2 and segments[0] in ("embed", "shorts", "live"):
            return f"https://www.youtube.com/watch?v={segments[1]}"
        if video := parse_qs(parts.query).get("v"):
            return f"https://www.youtube.com/watch?v={video[0]}"
    if host == "player.vimeo.com" and len(segments) >= 2 and segments[0] == "video":
        return f"https://vimeo.com/{segments[1]}"
    return url


def link_label(url: str, tag: str) -> str:
    host = (urlsplit(url).hostname or "").lower()
    for domain, label in _WHERE:
        if host == domain or host.endswith("." + domain):
            return label
    if tag == "video":
        return "Watch the video"
    if tag == "audio":
        return "Listen to the recording"
    return f"Open the embedded content on {host.removeprefix('www.')}"


@dataclass
class _Skip:
    """An element being replaced: what it holds that the replacement needs."""

    tag: str
    kind: str  # "drop" (nothing instead), "media" or "quote" (a link instead)
    url: str | None = None
    depth: int = 1
    links: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    in_link: int = 0
    own_text: bool = False  # any text outside links ("View this post on Instagram" is not)


def _attr_text(name: str, value: str) -> str:
    return f' {name}="{html.escape(value, quote=True)}"'


class _Rewriter(HTMLParser):
    """One pass over the CMS HTML, writing HTML the sanitiser then cleans."""

    def __init__(self, base: str | None) -> None:
        super().__init__(convert_charrefs=True)
        self.base = base
        self.out: list[str] = []
        self.skip: _Skip | None = None

    # What to do with an element --------------------------------------------------

    def _start_skip(self, tag: str, attrs: dict[str, str | None]) -> _Skip | None:
        style = attrs.get("style") or ""
        if tag in _DROP or "hidden" in attrs or _HIDDEN_STYLE.search(style):
            return _Skip(tag, "drop")
        classes = attrs.get("class") or ""
        if _EMBED_CLASSES.search(classes):
            cited = attrs.get("data-instgrm-permalink") or attrs.get("cite")
            url = _absolute(cited or attrs.get("data-href") or attrs.get("data-url"), self.base)
            return _Skip(tag, "quote", url)
        if tag in _MEDIA:
            source = attrs.get("src") or attrs.get("data-src") or attrs.get("data")
            return _Skip(tag, "media", _absolute(source, self.base))
        return None

    def _finish_skip(self, skip: _Skip) -> None:
        if skip.kind == "drop":
            return
        url = skip.url or next(iter(skip.links[::-1]), None) or self.base
        quoted = [" ".join(p.split()) for p in "".join(skip.text).split("\n")]
        quoted = [p for p in quoted if p]
        if skip.kind == "quote" and quoted and skip.own_text:
            paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in quoted)
            self.out.append(f"<blockquote>{paragraphs}</blockquote>")
        if url:
            url = original_of(url)
            label = link_label(url, skip.tag)
            self.out.append(f'<p><a href="{html.escape(url)}">{html.escape(label)}</a></p>')

    # Parser callbacks -------------------------------------------------------------

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if self.skip is not None:
            skip = self.skip
            if tag == skip.tag:
                skip.depth += 1
            elif tag == "a":
                skip.in_link += 1
                if href := _absolute(values.get("href"), self.base):
                    skip.links.append(href)
            elif tag == "source" and (src := _absolute(values.get("src"), self.base)):
                skip.url = skip.url or src
            elif tag in ("p", "br", "div"):
                skip.text.append("\n")
            return
        if tag == "embed":  # void: replaced on the spot
            url = _absolute(values.get("src"), self.base)
            if url:
                self._finish_skip(_Skip(tag, "media", url))
            return
        replaced = self._start_skip(tag, values)
        if replaced is not None:
            if tag not in _VOID:
                self.skip = replaced
            return
        self.out.append(self._tag(tag, values))

    def _tag(self, tag: str, values: dict[str, str | None]) -> str:
        if tag == "img":
            lazy = values.get("data-src") or values.get("data-lazy-src")
            src = values.get("src") or ""
            if lazy and (not src or src.startswith("data:")):
                values["src"] = lazy
        parts = [f"<{tag}"]
        for name, value in values.items():
            if value is None:
                parts.append(f" {name}")
            elif name in ("href", "src"):
                url = _absolute(value, self.base)
                if url is not None or value.startswith(("mailto:", "tel:")):
                    parts.append(_attr_text(name, url or value))
            else:
                parts.append(_attr_text(name, value))
        return "".join(parts) + ">"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        skip = self.skip
        if skip is not None:
            if tag == skip.tag:
                skip.depth -= 1
                if skip.depth == 0:
                    self.skip = None
                    self._finish_skip(skip)
            elif tag in ("p", "div", "li"):
                skip.text.append("\n")
            elif tag == "a":
                skip.in_link = max(skip.in_link - 1, 0)
            return
        if tag not in _VOID:
            self.out.append(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        if self.skip is not None:
            if self.skip.kind == "quote":
                self.skip.text.append(re.sub(r"\s", " ", data))  # "\n" marks paragraphs
                self.skip.own_text |= not self.skip.in_link and bool(data.strip())
            return
        self.out.append(html.escape(data, quote=False))


def _image_width(tag: str, attribute: str, value: str) -> str | None:
    if tag != "img":
        return value
    if attribute == "height":
        return None  # the email CSS sets height:auto; a fixed height would distort
    if attribute == "width":
        digits = value.strip().removesuffix("px")
        if not digits.isdigit():
            return None
        return str(min(int(digits), MAX_IMAGE_WIDTH))
    return value


_cleaner = nh3.Cleaner(
    **CLEANER_OPTIONS, attribute_filter=_image_width, url_relative="deny", strip_comments=True
)


def email_html(source: str, base_url: str | None) -> str:
    """Email-safe HTML from CMS HTML; ``base_url`` is the entry's link."""
    rewriter = _Rewriter(base_url)
    rewriter.feed(source[:MAX_INPUT])
    rewriter.close()
    if rewriter.skip is not None:  # an element left open at the end: finish it anyway
        rewriter._finish_skip(rewriter.skip)
    return str(_cleaner.clean("".join(rewriter.out))).strip()


def render_cms_html(source: str, base_url: str | None) -> tuple[str, str]:
    """(HTML, plain text) of a statement from the site, like ``render_markdown``."""
    cleaned = email_html(source, base_url)
    return cleaned, html_to_text(cleaned)


def text_to_html(text: str) -> str:
    """Plain-text content (a JSON Feed ``content_text``) as paragraphs."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n"))]
    return "".join("<p>" + html.escape(p).replace("\n", "<br>") + "</p>" for p in paragraphs if p)
