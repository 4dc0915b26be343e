"""Message bytes, checked by parsing them the way a receiving mail system would."""

from __future__ import annotations

import binascii
import email.header
import email.policy
import re
import time
from email.message import EmailMessage
from email.parser import BytesParser
from html.parser import HTMLParser
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mailer.config import Settings
from mailer.render import (
    PREVIEW_UNSUBSCRIBE_URL,
    Renderer,
    StatementContent,
    clean_header_text,
    make_message_id,
)
from mailer.statements import render_markdown
from mailer.wire import qp_joints as _qp_joints

UNSUB = "https://news.example.org/unsubscribe/eyJzIjo0MiwicCI6InUifQ.Zx-_12.sig?a=1&b=2=3"
ONCE = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Feedback-ID",
    "Content-Type",
)


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "base_url": "https://news.example.org",
        "from_address": "updates@example.org",
        "from_name": "Campaign updates",
        "feedback_id": "statement:mailer:newsl1",
        "secret_key": "render-test-secret-key-0123456789abcdef",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(make_settings())


def content(
    title: str = "A statement", markdown: str = "Hello **world**.", **kw: Any
) -> StatementContent:
    html, text = render_markdown(markdown)
    values: dict[str, Any] = {"author": "Ann Example", "url": "https://news.example.org/s/1"}
    values.update(kw)
    return StatementContent(title=title, body_html=html, body_text=text, **values)


def build(
    renderer: Renderer, c: StatementContent | None = None, *, test: bool = False, **kw: str
) -> bytes:
    compiled = renderer.compile_statement(c or content(), blast_id=7, test=test)
    args = {
        "to": "reader@example.com",
        "unsubscribe_url": UNSUB,
        "message_id": make_message_id(renderer.settings, 7, 42),
    }
    args.update(kw)
    return compiled.build(**args)


def parse(raw: bytes) -> EmailMessage:
    msg = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


def header_lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def bodies(msg: EmailMessage) -> tuple[str, str]:
    text, html = msg.get_body(("plain",)), msg.get_body(("html",))
    assert text is not None and html is not None
    return tuple(str(p.get_content()).replace("\r\n", "\n") for p in (text, html))  # type: ignore[return-value]


def rfc2047_phrase(raw: bytes, name: bytes) -> str:
    """The display name as an RFC 2047 decoder (whitespace between words dropped) reads it."""
    lines = header_lines(raw)
    start = next(i for i, line in enumerate(lines) if line.startswith(name + b":"))
    value = lines[start].split(b": ", 1)[1]
    for line in lines[start + 1 :]:
        if not line.startswith(b" "):
            break
        value += line
    phrase = value.rsplit(b" <", 1)[0] if value.endswith(b">") else b""
    if phrase.startswith(b'"'):
        return re.sub(r"\\(.)", r"\1", phrase[1:-1].decode())
    return str(email.header.make_header(email.header.decode_header(phrase.decode())))


class Links(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.append(dict(attrs).get("href") or "")


def test_every_header_exactly_once(renderer: Renderer) -> None:
    raw = build(renderer)
    msg = parse(raw)
    names = [
        line.split(b":", 1)[0].decode().lower()
        for line in header_lines(raw)
        if line[:1] not in b" \t"
    ]
    for name in ONCE:
        assert len(msg.get_all(name) or []) == 1, name
        assert names.count(name.lower()) == 1, name
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["List-Id"] == '"Campaign updates" <updates.news.example.org>'
    assert msg["Feedback-ID"] == "statement:mailer:newsl1"
    assert msg["MIME-Version"] == "1.0"
    assert msg["To"].addresses[0].addr_spec == "reader@example.com"
    assert msg["From"].addresses[0].display_name == "Campaign updates"
    assert msg["From"].addresses[0].addr_spec == "updates@example.org"
    assert msg["Date"].datetime.utcoffset().total_seconds() == 0
    assert abs(msg["Date"].datetime.timestamp() - time.time()) < 5
    assert str(msg["Date"]).endswith(" +0000")
    assert re.fullmatch(r"<b7\.[0-9a-f]{32}@example\.org>", msg["Message-ID"])
    assert "X-Mailer-Test" not in msg
    assert not msg.defects


def test_wire_format_is_ascii_crlf_and_qp_lines_fit(renderer: Renderer) -> None:
    long_para = "Lorem ipsum = dolor " * 200 + "ümlaut " * 50
    raw = build(renderer, content(markdown=long_para + "\n\n" + "x" * 500))
    raw.decode("ascii")
    assert raw.count(b"\n") == raw.count(b"\r\n")
    assert max(len(line) for line in header_lines(raw)) <= 998
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert max(len(line) for line in body.split(b"\r\n")) <= 76


def test_list_unsubscribe_is_one_plain_line(renderer: Renderer) -> None:
    url = "https://news.example.org/unsubscribe/" + "A" * 700  # longer than any fold point
    raw = build(renderer, unsubscribe_url=url)
    lines = header_lines(raw)
    index = next(i for i, line in enumerate(lines) if line.lower().startswith(b"list-unsubscribe:"))
    line = lines[index]
    assert not lines[index + 1].startswith((b" ", b"\t")), "folded"
    assert b"=?" not in line
    assert (
        line
        == f"List-Unsubscribe: <{url}>, <mailto:updates@example.org?subject=unsubscribe>".encode()
    )
    assert line.count(b"https://") == 1 and line.count(b"mailto:") == 1
    assert parse(raw)["List-Unsubscribe"] == line.split(b": ", 1)[1].decode()


def test_multipart_alternative_text_then_html(renderer: Renderer) -> None:
    msg = parse(build(renderer))
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    for part in parts:
        assert part.get_content_charset() == "utf-8"
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
        assert not part.defects


def test_unsubscribe_url_with_equals_and_ampersand_survives(renderer: Renderer) -> None:
    text, html = bodies(parse(build(renderer)))
    assert f"Unsubscribe: {UNSUB}" in text
    assert UNSUB in Links(html).hrefs
    assert "&amp;b=2=3" in html  # escaped for HTML, then QP-encoded, and decoded back


def test_statement_shows_title_author_body_and_read_online(renderer: Renderer) -> None:
    c = content(
        title="Fish & <Chips>", markdown="# Heading\n\nBody [link](https://x.example/?q=1&r=2)"
    )
    text, html = bodies(parse(build(renderer, c)))
    assert "Fish &amp; &lt;Chips&gt;" in html and "<Chips>" not in html
    assert text.startswith("Fish & <Chips>\nBy Ann Example\n")
    assert "Body link (https://x.example/?q=1&r=2)" in text
    assert "https://x.example/?q=1&r=2" in Links(html).hrefs
    assert "https://news.example.org/s/1" in Links(html).hrefs
    assert "Read online: https://news.example.org/s/1" in text
    assert "confirmed your subscription at news.example.org" in text
    assert "confirmed your subscription at news.example.org" in html
    assert 'style="' in html and "<style>" in html  # inlined, only @media kept


@pytest.mark.parametrize("url", [None, "javascript:alert(1)"])
def test_no_read_online_without_web_url(renderer: Renderer, url: str | None) -> None:
    text, html = bodies(parse(build(renderer, content(url=url, author=None))))
    assert "Read online" not in text and "Read online" not in html
    assert "javascript" not in html


def test_markdown_script_never_reaches_html(renderer: Renderer) -> None:
    c = content(markdown="Hi <script>alert(1)</script>\n\n<img src=x onerror=alert(1)>")
    text, html = bodies(parse(build(renderer, c)))
    assert "<script" not in html.lower() and "onerror" not in html and "alert" not in text
    # even a body_html that skipped sanitizing (edited in the database) is cleaned
    raw_html = StatementContent("t", "<p>x</p><script>alert(2)</script>", "x", None, None)
    assert "alert(2)" not in bodies(parse(build(renderer, raw_html)))[1]


def test_unicode_title_round_trips(renderer: Renderer) -> None:
    title = ('Grüße "Ärger" = 😀 ☃ 日本語 =?utf-8?q?x?= ' * 10)[:300]
    raw = build(renderer, content(title=title))
    msg = parse(raw)
    assert msg["Subject"] == clean_header_text(title) == title.strip()
    subject = [ln for ln in header_lines(raw) if ln.startswith(b"Subject:")]
    assert subject and all(len(ln) <= 78 for ln in header_lines(raw)[:8])


def test_long_ascii_title_folds_and_round_trips(renderer: Renderer) -> None:
    title = " ".join(["word"] * 60)[:300]
    raw = build(renderer, content(title=title))
    assert b"=?" not in raw.split(b"\r\n\r\n", 1)[0]
    assert parse(raw)["Subject"] == title
    assert all(len(line) <= 78 for line in header_lines(raw) if not line.startswith(b"List-Unsub"))


@pytest.mark.parametrize(
    "bad",
    [
        "a@b.org\r\nBcc: x@evil.org",
        "a@b.org\n",
        "a@b.org\r",
        "Name <a@b.org>",
        "a b@c.org",
        "ü@b.org",
        "",
    ],
)
def test_recipient_that_could_inject_is_rejected(renderer: Renderer, bad: str) -> None:
    with pytest.raises(ValueError):
        build(renderer, to=bad)


@pytest.mark.parametrize(
    "field,bad",
    [
        ("unsubscribe_url", UNSUB + "\r\nBcc: x@evil.org"),
        ("unsubscribe_url", "https://x.org/a b"),
        ("unsubscribe_url", "https://x.org/a,b"),
        ("unsubscribe_url", "https://x.org/a>"),
        ("unsubscribe_url", "javascript:alert(1)"),
        ("unsubscribe_url", "https://x.org/ü"),
        ("message_id", "<a@b>\r\nBcc: x@evil.org"),
        ("message_id", "no-brackets@x"),
        ("date", "Mon, 1 Jan 2024 00:00:00 +0000\r\nBcc: x@evil.org"),
    ],
)
def test_spliced_values_that_could_inject_are_rejected(
    renderer: Renderer, field: str, bad: str
) -> None:
    with pytest.raises(ValueError):
        build(renderer, **{field: bad})  # type: ignore[arg-type]


def test_title_and_names_with_line_breaks_cannot_add_headers() -> None:
    r = Renderer(make_settings(from_name="Evil\r\nBcc: x@evil.org", list_name="L\nX-Evil: 1"))
    raw = build(r, content(title="Hi\r\nBcc: y@evil.org\u2028there"))
    msg = parse(raw)
    assert "Bcc" not in msg and "X-Evil" not in msg
    assert msg["Subject"] == "Hi Bcc: y@evil.org there"
    assert msg["From"].addresses[0].display_name == "Evil Bcc: x@evil.org"
    confirm = parse(r.confirmation(to="a@b.org", confirm_url=UNSUB))
    assert "Bcc" not in confirm and "X-Evil" not in confirm


def test_long_display_name_decodes_per_rfc_2047() -> None:
    for name in ("日本語" * 20, "Grüße aus der schönen Stadt am Fluss, Ihre Kampagnenleitung"):
        raw = build(Renderer(make_settings(from_name=name)))
        assert rfc2047_phrase(raw, b"From") == name
        assert all(len(line) <= 78 for line in header_lines(raw) if b"List-Unsub" not in line)


def test_test_copy_is_marked(renderer: Renderer) -> None:
    msg = parse(build(renderer, test=True))
    assert msg["Subject"] == "[TEST] A statement"
    assert msg["X-Mailer-Test"] == "yes"


def test_no_feedback_id_unless_configured() -> None:
    assert "Feedback-ID" not in parse(build(Renderer(make_settings(feedback_id=None))))


def test_date_can_be_given(renderer: Renderer) -> None:
    msg = parse(build(renderer, date="Mon, 01 Jan 2024 00:00:00 +0000"))
    assert msg["Date"].datetime.year == 2024


def test_message_ids() -> None:
    s = make_settings()
    same = make_message_id(s, 3, 9)
    assert same == make_message_id(s, 3, 9)  # a retried delivery keeps its id
    assert len({same, make_message_id(s, 3, 10), make_message_id(s, 4, 9)}) == 3
    randoms = {make_message_id(s, None, None) for _ in range(1000)} | {make_message_id(s, 3, None)}
    assert len(randoms) == 1001
    assert all(re.fullmatch(r"<[^<>@\s]+@example\.org>", m) for m in randoms)


def test_preview_has_placeholder_link(renderer: Renderer) -> None:
    html = renderer.preview_html(content(title="<b>Preview</b>"))
    assert PREVIEW_UNSUBSCRIBE_URL in Links(html).hrefs
    assert "&lt;b&gt;Preview&lt;/b&gt;" in html and "mailerunsub" not in html


def test_confirmation_mail() -> None:
    r = Renderer(make_settings(list_name="Grüne Updates"))
    url = "https://news.example.org/confirm/tok.en?x=1&y=2"
    raw = r.confirmation(to="new@example.com", confirm_url=url)
    raw.decode("ascii")
    msg = parse(raw)
    for name in ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"):
        assert len(msg.get_all(name) or []) == 1, name
    for name in ("List-Unsubscribe", "List-Unsubscribe-Post", "List-Id", "Feedback-ID"):
        assert name not in msg
    # Nothing a visitor typed but the address: no display name, no name in the greeting.
    assert str(msg["To"]) == "new@example.com" and msg["To"].addresses[0].display_name == ""
    assert msg["Subject"] == "Confirm your subscription to Grüne Updates"
    text, html = bodies(msg)
    assert url in text and url in Links(html).hrefs
    assert "Confirm your subscription" in html
    assert "ignore this mail" in text and "not be subscribed" in text
    assert "The link works for 7 days." in text
    assert "Hello," in html and "Hello," in text
    with pytest.raises(ValueError):
        r.confirmation(to="a@b.org\r\nBcc: x@y.org", confirm_url=url)


# Properties -----------------------------------------------------------------------

_slow = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_slow
@given(title=st.text(max_size=300))
def test_any_title_parses_and_subject_decodes_back(renderer: Renderer, title: str) -> None:
    expected = clean_header_text(title)
    assume(expected)
    raw = build(renderer, content(title=title))
    raw.decode("ascii")
    msg = parse(raw)
    assert msg["Subject"] == expected
    assert not msg.defects
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


@settings(max_examples=60, deadline=None)
@given(name=st.text(max_size=120))
def test_any_display_name_parses_back(name: str) -> None:
    expected = clean_header_text(name)
    r = Renderer(make_settings(from_name=name))
    msg = parse(build(r))
    sender = msg["From"].addresses[0]
    assert sender.addr_spec == "updates@example.org"
    if len(expected.encode()) <= 42:  # one encoded-word: exact
        assert sender.display_name == expected
    # CPython's address parser adds a space between encoded-words (RFC 2047 says drop it)
    assert sender.display_name.replace(" ", "") == expected.replace(" ", "")
    assert rfc2047_phrase(build(r), b"From") == expected


_url_tail = st.from_regex(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+;=%]{0,900}", fullmatch=True)


@_slow
@given(tail=_url_tail)
def test_any_valid_url_is_spliced_exactly(renderer: Renderer, tail: str) -> None:
    url = "https://x.example/u/" + tail
    raw = build(renderer, unsubscribe_url=url)
    text, html = bodies(parse(raw))
    assert text.rstrip("\n").endswith(f"Unsubscribe: {url}")
    assert Links(html).hrefs[-1] == url
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert max(len(line) for line in body.split(b"\r\n")) <= 76


@settings(max_examples=300, deadline=None)
@given(
    segments=st.lists(
        st.text(alphabet=st.sampled_from("ab =\t\r\nü.é-"), max_size=200), min_size=1, max_size=4
    ),
    value=st.text(alphabet=st.sampled_from("a=&%.~ "), min_size=1, max_size=200),
)
def test_segment_splicing_decodes_to_the_plain_join(segments: list[str], value: str) -> None:
    """The proof that splicing pre-encoded segments is valid quoted-printable."""
    from mailer.wire import crlf as _crlf
    from mailer.wire import qp as _qp

    joined = _qp(value.encode()).join(_qp_joints(segments))
    expected = _crlf(value.join(segments)).encode()
    assert binascii.a2b_qp(joined) == expected
    assert all(len(line) <= 76 for line in joined.split(b"\r\n"))
    assert joined.count(b"\n") == joined.count(b"\r\n")
    for line in joined.split(b"\r\n"):  # no unencoded trailing whitespace
        assert not line.endswith((b" ", b"\t"))


def test_build_speed_5kb(renderer: Renderer) -> None:
    """Prints the cost; speed is judged by the benchmarks, not asserted here."""
    para = (
        "Lorem ipsum dolor sit amet, **consectetur** adipiscing elit, sed do "
        "[eiusmod](https://example.org/a?b=c) tempor incididunt ut labore et dolore. "
    )
    c = content(markdown="\n\n".join([para * 2] * 16))
    assert 4500 < len(c.body_text) + 1000
    compiled = renderer.compile_statement(c, blast_id=1)
    mid = make_message_id(renderer.settings, 1, 1)
    n = 20000
    start = time.perf_counter()
    for i in range(n):
        compiled.build(to=f"r{i}@example.com", unsubscribe_url=UNSUB, message_id=mid)
    per = (time.perf_counter() - start) / n * 1e6
    size = len(compiled.build(to="r@example.com", unsubscribe_url=UNSUB, message_id=mid))
    print(f"\nCompiledMessage.build: {per:.1f} µs per message ({size} bytes)")


def test_ascii_title_that_looks_encoded_is_encoded(renderer: Renderer) -> None:
    title = "Price =?utf-8?q?=E2=82=AC?= today"
    raw = build(renderer, content(title=title))
    assert parse(raw)["Subject"] == title
