"""Markdown rendering, sanitizing, Markdown files, input validation and the records."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from mailer.db import make_engine, make_sessionmaker
from mailer.migrate import upgrade
from mailer.statements import (
    StatementIn,
    create_statement,
    get_statement,
    list_statements,
    parse_markdown_file,
    render_markdown,
    update_statement,
)

# Markdown → HTML + text --------------------------------------------------------


def test_commonmark_and_tables() -> None:
    html, text = render_markdown(
        "Some *em* and **strong**, `code`, ~~gone~~.\n\n| a | b |\n|---|--:|\n| 1 | 2 |\n"
    )
    assert "<em>em</em>" in html and "<strong>strong</strong>" in html
    assert "<code>code</code>" in html and "<s>gone</s>" in html
    assert "<table>" in html and '<td style="text-align:right">2</td>' in html
    assert "Some em and strong, code, gone." in text
    assert "a | b\n1 | 2" in text


def test_plain_text_is_readable() -> None:
    _, text = render_markdown(
        "# Title\n\nFirst paragraph\nwrapped line.  \nHard break.\n\n"
        "- one\n- two\n  - nested\n\n3. three\n4. four\n\n"
        "> quoted\n\n"
        "See [the site](https://example.org/a?b=1&c=2), <https://auto.example>, "
        "and [mail](mailto:x@example.org).\n\n"
        "```\ncode  block\n```\n\n---\n\nTom &amp; Jerry &lt;3"
    )
    assert text == (
        "Title\n=====\n\n"
        "First paragraph wrapped line.\nHard break.\n\n"
        "- one\n- two\n  - nested\n\n"
        "3. three\n4. four\n\n"
        "> quoted\n\n"
        "See the site (https://example.org/a?b=1&c=2), https://auto.example, "
        "and mail (mailto:x@example.org).\n\n"
        "    code  block\n\n" + "-" * 40 + "\n\nTom & Jerry <3\n"
    )


def test_links_get_noopener_and_no_linkify() -> None:
    html, _ = render_markdown("[x](https://example.org) and www.example.com")
    assert '<a href="https://example.org" rel="noopener">x</a>' in html
    assert "www.example.com</a>" not in html


@pytest.mark.parametrize(
    "source,forbidden",
    [
        ("<script>alert(1)</script>hi", ["<script", "alert"]),
        ("<style>body{display:none}</style>hi", ["<style", "display:none"]),
        ('<img src="x.png" onerror="alert(1)">', ["onerror", "alert"]),
        ('<a href="javascript:alert(1)">x</a>', ["javascript", "alert"]),
        ('<a href="JaVaScRiPt:alert(1)">x</a>', ["javascript", "alert"]),
        ('<a href="&#106;avascript:alert(1)">x</a>', ["javascript", "alert"]),
        ("[x](javascript:alert(1))", ['href="javascript']),
        ('<iframe src="https://evil.example"></iframe>', ["<iframe", "evil"]),
        ('<img src="data:image/svg+xml;base64,PHN2Zz4=">', ["data:"]),
        ('<p style="position:fixed" onclick="x()">p</p>', ["position", "onclick"]),
        ('<form action="https://evil.example"><input name="pw"></form>', ["<form", "<input"]),
        ("<svg><script>alert(1)</script></svg>", ["<svg", "alert"]),
    ],
)
def test_sanitizing(source: str, forbidden: list[str]) -> None:
    html, text = render_markdown(source)
    for bad in forbidden:
        assert bad.lower() not in html.lower(), html
    if "alert" in forbidden:  # else the source was shown as literal text, which is harmless
        assert "alert" not in text


def test_allowed_html_survives() -> None:
    html, text = render_markdown(
        '<p>Hi <b>there</b> <img src="https://x.example/a.png" alt="A"></p>'
    )
    assert "<b>there</b>" in html and 'src="https://x.example/a.png"' in html
    assert text == "Hi there [A]\n"


def test_empty_and_whitespace_markdown() -> None:
    assert render_markdown("") == ("", "")


# Markdown files -------------------------------------------------------------------


def test_front_matter() -> None:
    draft = parse_markdown_file(
        "\ufeff---\r\ntitle: \"Hello: world\"\r\nauthor: 'Ann'\r\nurl: https://x.example/s\r\n"
        "date: 2024-01-01\r\n# a comment\r\n---\r\n# Kept heading\r\n\r\nBody\r\n"
    )
    assert draft.title == "Hello: world"
    assert draft.author == "Ann" and draft.url == "https://x.example/s"
    assert draft.body_markdown == "# Kept heading\n\nBody\n"
    assert draft.validate().title == "Hello: world"


def test_title_from_first_heading_outside_code() -> None:
    draft = parse_markdown_file("Intro\n\n```\n# not a title\n```\n\n#   The title  ##\n\nBody\n")
    assert draft.title == "The title"
    assert "The title" not in draft.body_markdown and "# not a title" in draft.body_markdown
    assert draft.author is None and draft.url is None


def test_front_matter_without_title_falls_back_to_heading() -> None:
    draft = parse_markdown_file("---\nauthor: Bo\n---\n# Heading\nBody")
    assert (draft.title, draft.author, draft.body_markdown) == ("Heading", "Bo", "Body\n")


@pytest.mark.parametrize(
    "text,message",
    [
        ("Just text\n\n## Not h1", "no title"),
        ("---\ntitle: x\nBody without end", "no closing"),
        ("---\njust words\n---\n# T", "expected 'key: value'"),
        ("#NoSpace\n", "no title"),
    ],
)
def test_bad_markdown_files(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_markdown_file(text)


def test_draft_validation_uses_api_rules() -> None:
    with pytest.raises(ValidationError, match="url must be an absolute"):
        parse_markdown_file("---\ntitle: T\nurl: ftp://x\n---\nBody").validate()


# StatementIn --------------------------------------------------------------------


def valid(**kw: object) -> dict[str, object]:
    data: dict[str, object] = {"title": "T", "body_markdown": "Body"}
    data.update(kw)
    return data


def test_statement_in_normalizes() -> None:
    s = StatementIn.model_validate(valid(title="  Hi  ", author="  ", url=" https://x.example/a "))
    assert (s.title, s.author, s.url) == ("Hi", None, "https://x.example/a")
    assert StatementIn.model_validate(valid(title="t" * 300, author="a" * 200)).title == "t" * 300
    assert StatementIn.model_validate(valid(title='Grüße 👩‍💻 "="')).title == 'Grüße 👩‍💻 "="'


@pytest.mark.parametrize(
    "data,field,message",
    [
        (valid(title=""), "title", "title must not be empty"),
        (valid(title="   "), "title", "title must not be empty"),
        (valid(title="t" * 301), "title", "at most 300 characters"),
        (valid(title="a\nb"), "title", "single line"),
        (valid(title="a\rb"), "title", "single line"),
        (valid(title="a\x07b"), "title", "single line"),
        (valid(title="a\u2028b"), "title", "single line"),
        (valid(title=5), "title", "string"),
        (valid(body_markdown=""), "body_markdown", "must not be empty"),
        (valid(body_markdown=" \n "), "body_markdown", "must not be empty"),
        (valid(body_markdown="x" * 200_001), "body_markdown", "at most 200000"),
        (valid(body_markdown="a\x00b"), "body_markdown", "NUL"),
        (valid(author="a" * 201), "author", "at most 200"),
        (valid(author="a\nb"), "author", "single line"),
        (valid(url="javascript:alert(1)"), "url", "http:// or https://"),
        (valid(url="ftp://x.example"), "url", "http:// or https://"),
        (valid(url="/relative"), "url", "http:// or https://"),
        (valid(url="https://x.example/" + "a" * 2000), "url", "at most 2000"),
        (valid(url="https://x.example/a b"), "url", "http:// or https://"),
        (valid(titel="typo"), "titel", "Extra inputs"),
        ({"body_markdown": "x"}, "title", "required"),
    ],
)
def test_statement_in_errors(data: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        StatementIn.model_validate(data)
    errors = info.value.errors()
    assert errors[0]["loc"] == (field,)
    assert message in errors[0]["msg"]


# Records --------------------------------------------------------------------------


@pytest.fixture
async def session(tmp_path: Path) -> AsyncIterator[AsyncSession]:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 't.db'}")
    await upgrade(engine)
    async with make_sessionmaker(engine)() as s:
        yield s
    await engine.dispose()


async def test_create_get_update_list(session: AsyncSession) -> None:
    data = StatementIn(title="First", body_markdown="Hi <script>x</script>**there**", author="Ann")
    first = await create_statement(session, data, editor_id=None)
    assert first.id is not None
    assert first.body_html == "<p>Hi <strong>there</strong></p>\n"
    assert first.body_text == "Hi there\n"
    second = await create_statement(session, StatementIn(title="Second", body_markdown="B"), None)

    session.expunge_all()
    loaded = await get_statement(session, first.id)
    assert loaded is not None and loaded.title == "First" and loaded.author == "Ann"
    assert loaded.created_at.tzinfo is not None
    assert await get_statement(session, 10_000) is None

    changed = await update_statement(
        session, first.id, StatementIn(title="First, edited", body_markdown="New *body*")
    )
    assert changed is not None and changed.author is None
    session.expunge_all()
    reloaded = await get_statement(session, first.id)
    assert reloaded is not None
    assert (reloaded.title, reloaded.body_html, reloaded.body_text) == (
        "First, edited",
        "<p>New <em>body</em></p>\n",
        "New body\n",
    )
    assert await update_statement(session, 10_000, data) is None

    assert [s.id for s in await list_statements(session, limit=10, offset=0)] == [
        second.id,
        first.id,
    ]
    assert [s.id for s in await list_statements(session, limit=1, offset=1)] == [first.id]
    assert [s.id for s in await list_statements(session, limit=0, offset=-5)] == [second.id]
