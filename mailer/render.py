"""Message bytes: compile once per blast, splice per recipient.

A blast can be a million messages. Building an ``EmailMessage`` costs ~1.6 ms
each, rendering Jinja ~45 µs, inlining CSS ~55 µs; so everything the recipients
share (headers, templates, inlined CSS, quoted-printable bodies) is done once, in
:meth:`Renderer.compile_statement`, and :meth:`CompiledMessage.build` only checks
and splices the To address, unsubscribe URL, Message-ID and Date.

Splicing into a quoted-printable body is safe because each shared segment is
encoded on its own, starting at column 0 and ending with a soft line break
(``=\\r\\n``, which decodes to nothing); the recipient's value is encoded the same
way. Decoding the joined bytes therefore gives exactly segment + value + segment,
every line stays within 76 characters, and ``=`` in a URL becomes ``=3D``.
Every header is written by hand because Python's email policies fold long
headers into RFC 2047 encoded-words, which Gmail rejects in List-Unsubscribe.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate

import css_inline
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape

from mailer.config import Settings
from mailer.models import Statement
from mailer.statements import sanitize_html

TEST_SUBJECT_PREFIX = "[TEST] "
TEST_HEADER = b"X-Mailer-Test: yes\r\n"
PREVIEW_UNSUBSCRIBE_URL = "#unsubscribe-preview"

CRLF = b"\r\n"
_SOFT_BREAK = b"=\r\n"
_QP_LINE = 76

_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9.-]{1,253}")
# RFC 3986 characters minus the comma, which would split the List-Unsubscribe list.
_URL = re.compile(r"https?://[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+;=%]+")
_MESSAGE_ID = re.compile(r"<[!-;=?-~]+@[!-;=?-~]+>")
_PRINTABLE = re.compile(r"[ -~]{1,100}")
# C0/C1 controls and Unicode line separators: anything a header parser might treat
# as a line break becomes a plain space.
_TO_SPACE = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029], " ")


# Header text ----------------------------------------------------------------------


def clean_header_text(text: str) -> str:
    """One line of text: control characters become spaces, runs of whitespace (NBSP
    too, which parsers treat inconsistently) collapse to one space.
    This is also what a test should expect a Subject or display name to decode to."""
    return " ".join(text.translate(_TO_SPACE).split())


def _encoded_words(text: str) -> bytes:
    """RFC 2047 B-encoded words of at most 42 UTF-8 bytes (68 characters, so a folded
    line stays under 78), joined by folding whitespace, which decoders drop.

    Words end after a space where possible: CPython's address parser wrongly keeps
    a space between encoded-words in display names, and this way it only doubles one."""
    chunks: list[str] = []
    chunk = ""
    for ch in text:
        if len((chunk + ch).encode()) > 42:
            cut = chunk.rfind(" ") + 1
            if cut == 0 or len((chunk[cut:] + ch).encode()) > 42:
                cut = len(chunk)
            chunks.append(chunk[:cut])
            chunk = chunk[cut:]
        chunk += ch
    chunks.append(chunk)
    return b"\r\n ".join(b"=?utf-8?b?" + base64.b64encode(c.encode()) + b"?=" for c in chunks)


def _needs_encoding(text: str) -> bool:
    return not text.isascii() or "=?" in text


def _unstructured(name: str, text: str) -> bytes:
    """A header line for free text (Subject): plain ASCII folded at spaces, anything
    else as encoded-words."""
    text = clean_header_text(text)
    if _needs_encoding(text):
        return name.encode() + b": " + _encoded_words(text) + CRLF
    lines: list[str] = [f"{name}:"]
    for word in text.split(" "):
        if len(lines[-1]) + 1 + len(word) > 78 and lines[-1] != f"{name}:":
            lines.append("")
        lines[-1] += " " + word
    return "\r\n".join(lines).encode() + CRLF


def _phrase(text: str) -> bytes:
    """A display name: a quoted-string when ASCII, encoded-words otherwise."""
    text = clean_header_text(text)
    if _needs_encoding(text):
        return _encoded_words(text)
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'


def _mailbox(name: str | None, address: str) -> bytes:
    """``"Name" <address>``, or the bare address when there is no name."""
    addr = _idna_address(address)
    if not clean_header_text(name or ""):
        return addr
    phrase = _phrase(name or "")
    last_line = len(phrase) - phrase.rfind(b"\n") + len("From: ")
    return phrase + (b"\r\n <" if last_line + len(addr) > 75 else b" <") + addr + b">"


def _idna_address(address: str) -> bytes:
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.encode('idna').decode()}".encode()


def _check(pattern: re.Pattern[str], value: str, what: str) -> bytes:
    if not pattern.fullmatch(value):
        raise ValueError(f"invalid {what} for a mail header: {value[:200]!r}")
    return value.encode()


# Quoted-printable segments ------------------------------------------------------


def _crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")


def _qp(data: bytes) -> bytes:
    """b2a_qp (C, fast) with CRLF soft breaks, and room left on the last line for the
    ``=`` of the soft break that the splice appends."""
    encoded = binascii.b2a_qp(data)
    if b"\n" not in data:  # b2a_qp only writes CRLF when the input used it
        encoded = encoded.replace(b"=\n", _SOFT_BREAK)
    start = encoded.rfind(b"\n") + 1
    if len(encoded) - start >= _QP_LINE:
        cut = start + _QP_LINE - 1
        if encoded[cut - 1 : cut] == b"=":
            cut -= 1
        elif encoded[cut - 2 : cut - 1] == b"=":
            cut -= 2
        encoded = encoded[:cut] + _SOFT_BREAK + encoded[cut:]
    return encoded


def _qp_joints(segments: list[str]) -> list[bytes]:
    """Encoded segments, each glued to its neighbours' values by soft line breaks, for
    ``value.join(joints)``."""
    joints: list[bytes] = []
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        encoded = _qp(_crlf(segment).encode())
        head = _SOFT_BREAK if i > 0 and (encoded or i < last) else b""
        tail = _SOFT_BREAK if i < last and encoded and not encoded.endswith(CRLF) else b""
        joints.append(head + encoded + tail)
    return joints


def _part_header(boundary: bytes, subtype: bytes) -> bytes:
    return (
        b"--" + boundary + b"\r\nContent-Type: text/" + subtype + b'; charset="utf-8"\r\n'
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    )


def _multipart(boundary: bytes) -> bytes:
    return b'Content-Type: multipart/alternative; boundary="' + boundary + b'"\r\n\r\n'


def _duration(seconds: int) -> str:
    """How long the confirmation link works, as people say it: "7 days", "36 hours"."""
    units = (("day", 86400), ("hour", 3600))
    unit, size = next(((u, n) for u, n in units if seconds >= 2 * n), ("minute", 60))
    count = max(seconds // size, 1)
    return f"{count} {unit}{'s' if count != 1 else ''}"


@functools.lru_cache(maxsize=2)
def _date(second: int) -> bytes:
    """formatdate() costs a few µs; one string per second is plenty for a Date header.
    "+0000" rather than the obsolete "GMT" zone of RFC 5322."""
    return formatdate(second, usegmt=True).removesuffix("GMT").encode() + b"+0000"


def make_message_id(settings: Settings, blast_id: int | None, subscriber_id: int | None) -> str:
    """A blast's delivery gets the same Message-ID on every attempt, so a copy repeated
    after a worker crash can be deduplicated by the receiver (Gmail does); the HMAC
    keeps subscriber ids private. Anything else gets a random one."""
    domain = settings.sender_domain.encode("idna").decode()
    if blast_id is not None and subscriber_id is not None:
        key = settings.signing_keys[-1].encode()
        digest = hmac.new(key, f"msgid:{blast_id}:{subscriber_id}".encode(), hashlib.sha256)
        return f"<b{blast_id}.{digest.hexdigest()[:24]}@{domain}>"
    return f"<{time.time_ns():x}.{secrets.token_hex(8)}@{domain}>"


_BLAST_MESSAGE_ID = re.compile(r"<b(\d{1,18})\.([0-9a-f]{24})@[^<>\s]{1,255}>")


def read_message_id(settings: Settings, message_id: str, subscriber_id: int) -> int | None:
    """The blast id in a Message-ID made by :func:`make_message_id` for ``subscriber_id``,
    or None unless its HMAC verifies (under any accepted key). The HMAC binds blast and
    subscriber, so a bounce or complaint carrying it proves both."""
    match = _BLAST_MESSAGE_ID.fullmatch(message_id.strip())
    if match is None:
        return None
    blast_id, mac = int(match.group(1)), match.group(2)
    for key in settings.signing_keys:
        digest = hmac.new(key.encode(), f"msgid:{blast_id}:{subscriber_id}".encode(), "sha256")
        if hmac.compare_digest(digest.hexdigest()[:24], mac):
            return blast_id
    return None


# Statements ---------------------------------------------------------------------


@dataclass(frozen=True)
class StatementContent:
    """What the statement templates need; detached from the ORM so a worker can keep it."""

    title: str
    body_html: str
    body_text: str
    author: str | None
    url: str | None

    @classmethod
    def from_model(cls, statement: Statement) -> StatementContent:
        s = statement
        return cls(s.title, s.body_html, s.body_text, s.author, s.url)


@dataclass(frozen=True, slots=True)
class CompiledMessage:
    """One statement's message for one blast, as bytes with four holes."""

    blast_id: int | None  # lets a worker check which blast a cached message belongs to
    subject: str  # as it decodes, for logs and the admin UI
    _head: bytes
    _tail: bytes
    _text: list[bytes]
    _middle: bytes
    _html: list[bytes]
    _end: bytes
    _url_max: int

    def build(
        self, *, to: str, unsubscribe_url: str, message_id: str, date: str | None = None
    ) -> bytes:
        """The full RFC 5322 message (CRLF, ASCII) for one recipient, ready for DATA.

        Raises ValueError for any value that could break out of its header line."""
        url = _check(_URL, unsubscribe_url, "unsubscribe URL")
        if len(url) > self._url_max:
            raise ValueError("unsubscribe URL too long for a single List-Unsubscribe line")
        return b"".join(
            (
                self._head,
                b"To: ",
                _check(_ADDRESS, to, "recipient address"),
                b"\r\nDate: ",
                _check(_PRINTABLE, date, "date") if date is not None else _date(int(time.time())),
                b"\r\nMessage-ID: ",
                _check(_MESSAGE_ID, message_id, "Message-ID"),
                b"\r\nList-Unsubscribe: <",
                url,
                self._tail,
                _qp(url).join(self._text),
                self._middle,
                _qp(str(escape(unsubscribe_url)).encode()).join(self._html),
                self._end,
            )
        )


class Renderer:
    """Templates and sender identity for every mail the service sends."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.env = Environment(
            loader=FileSystemLoader(settings.templates_dir),
            autoescape=select_autoescape(["html"]),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._inliner = css_inline.CSSInliner(load_remote_stylesheets=False, keep_at_rules=True)
        self._from = b"From: " + _mailbox(settings.from_name, settings.from_address) + CRLF
        list_id = settings.list_id.encode("idna")
        feedback = b""
        if settings.feedback_id:
            feedback = b"Feedback-ID: " + _check(_PRINTABLE, settings.feedback_id, "feedback ID")
            feedback += CRLF
        # The rest of the List-Unsubscribe line, then the list headers every statement has.
        self._list_tail = b"".join(
            (
                b">, <mailto:" + _idna_address(settings.from_address) + b"?subject=unsubscribe>",
                b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
                b"List-Id: " + _phrase(settings.list_name) + b" <" + list_id + b">\r\n",
                feedback,
            )
        )

    def _context(self, content: StatementContent, unsubscribe_url: str) -> dict[str, object]:
        return {
            "title": content.title,
            "author": content.author,
            "url": content.url if (content.url or "").startswith(("https://", "http://")) else None,
            # Sanitized when saved; again here so a row edited behind our back is harmless.
            "body_html": Markup(sanitize_html(content.body_html)),  # noqa: S704
            "body_text": content.body_text.strip("\n"),
            "preheader": " ".join(content.body_text.split())[:140],
            "unsubscribe_url": unsubscribe_url,
            "site_host": self.settings.public_host,
            "list_name": self.settings.list_name,
        }

    def _html(self, template: str, context: Mapping[str, object]) -> str:
        return str(self._inliner.inline(self.env.get_template(template).render(context)))

    def _segments(self, content: StatementContent) -> tuple[list[str], list[str]]:
        """Text and HTML split where the unsubscribe URL goes. The marker is random
        alphanumerics, so CSS inlining and escaping leave it alone and no statement
        can contain it by accident."""
        marker = f"mailerunsub{secrets.token_hex(12)}"
        context = self._context(content, marker)
        text = self.env.get_template("email/statement.txt").render(context).split(marker)
        html = self._html("email/statement.html", context).split(marker)
        if len(text) < 2 or len(html) < 2:
            raise RuntimeError("statement templates must show the unsubscribe link")
        return text, html

    def compile_statement(
        self, content: StatementContent, *, blast_id: int | None, test: bool = False
    ) -> CompiledMessage:
        """Everything but the recipient, once per blast (or per test send)."""
        subject = (TEST_SUBJECT_PREFIX if test else "") + content.title
        text, html = self._segments(content)
        boundary = f"=_m{secrets.token_hex(12)}".encode()  # "=_" cannot occur in QP
        head = b"".join((self._from, _unstructured("Subject", subject), b"MIME-Version: 1.0\r\n"))
        tail = self._list_tail + (TEST_HEADER if test else b"") + _multipart(boundary)
        tail += _part_header(boundary, b"plain")
        return CompiledMessage(
            blast_id,
            clean_header_text(subject),
            head,
            tail,
            _qp_joints(text),
            CRLF + _part_header(boundary, b"html"),
            _qp_joints(html),
            b"\r\n--" + boundary + b"--\r\n",
            998 - len(b"List-Unsubscribe: <") - len(tail.split(CRLF, 1)[0]),
        )

    def preview_html(self, content: StatementContent) -> str:
        """The email HTML as a subscriber sees it, with a placeholder unsubscribe link."""
        _, html = self._segments(content)
        return str(escape(PREVIEW_UNSUBSCRIBE_URL)).join(html)

    def confirmation(self, *, to: str, confirm_url: str) -> bytes:
        """The double opt-in mail: transactional, so no List-Unsubscribe and no List-Id.

        It holds nothing the visitor typed but the address: anyone can fill in the form,
        and a free-text name in the greeting or in ``To`` would let a stranger mail their
        own words from our authenticated domain to any inbox (docs/security.md).
        """
        _check(_ADDRESS, to, "recipient address")
        _check(_URL, confirm_url, "confirmation URL")
        s = self.settings
        context = {
            "confirm_url": confirm_url,
            "list_name": s.list_name,
            "site_host": s.public_host,
            "valid_for": _duration(s.confirm_token_ttl_s),
        }
        text = self.env.get_template("email/confirm.txt").render(context)
        html = self._html("email/confirm.html", context)
        boundary = f"=_m{secrets.token_hex(12)}".encode()
        return b"".join(
            (
                self._from,
                b"To: " + _mailbox(None, to) + CRLF,
                _unstructured("Subject", f"Confirm your subscription to {s.list_name}"),
                b"Date: " + _date(int(time.time())) + CRLF,
                b"Message-ID: " + make_message_id(s, None, None).encode() + CRLF,
                b"MIME-Version: 1.0\r\n",
                _multipart(boundary),
                _part_header(boundary, b"plain"),
                _qp(_crlf(text).encode()),
                CRLF + _part_header(boundary, b"html"),
                _qp(_crlf(html).encode()),
                b"\r\n--" + boundary + b"--\r\n",
            )
        )

    def notice(
        self, *, to: str, subject: str, template: str, context: Mapping[str, object]
    ) -> bytes:
        """A transactional mail to an editor (``email/<template>.txt`` and ``.html``): no
        list headers, as it goes to the team, not to subscribers."""
        _check(_ADDRESS, to, "recipient address")
        values: dict[str, object] = {
            "list_name": self.settings.list_name,
            "site_host": self.settings.public_host,
        }
        values.update(context)
        text = self.env.get_template(f"email/{template}.txt").render(values)
        html = self._html(f"email/{template}.html", values)
        boundary = f"=_m{secrets.token_hex(12)}".encode()
        return b"".join(
            (
                self._from,
                b"To: " + _mailbox(None, to) + CRLF,
                _unstructured("Subject", subject),
                b"Date: " + _date(int(time.time())) + CRLF,
                b"Message-ID: " + make_message_id(self.settings, None, None).encode() + CRLF,
                b"MIME-Version: 1.0\r\n",
                _multipart(boundary),
                _part_header(boundary, b"plain"),
                _qp(_crlf(text).encode()),
                CRLF + _part_header(boundary, b"html"),
                _qp(_crlf(html).encode()),
                b"\r\n--" + boundary + b"--\r\n",
            )
        )
