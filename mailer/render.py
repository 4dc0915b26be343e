"""Message bytes: compile once per blast, splice per recipient.

A blast can be a million messages. Building an ``EmailMessage`` costs ~1.6 ms
each, rendering Jinja ~45 µs, inlining CSS ~55 µs; so everything the recipients
share (headers, templates, inlined CSS, quoted-printable bodies) is done once, in
:meth:`Renderer.compile_statement`, and :meth:`CompiledMessage.build` only checks
and splices the To address, unsubscribe URL, Message-ID and Date. For a blast,
:meth:`CompiledMessage.wire` gives the message in the form it follows SMTP's DATA,
line ends and dot-stuffing done once per blast too (docs/smtp.md).

Splicing into a quoted-printable body is safe because each shared segment is
encoded on its own, starting at column 0 and ending with a soft line break
(``=\\r\\n``, which decodes to nothing); the recipient's value is encoded the same
way. Decoding the joined bytes therefore gives exactly segment + value + segment,
every line stays within 76 characters, and ``=`` in a URL becomes ``=3D``.
Every header is written by hand because Python's email policies fold long
headers into RFC 2047 encoded-words, which Gmail rejects in List-Unsubscribe.
"""

from __future__ import annotations

import hmac
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import css_inline
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape

from mailer.config import Settings
from mailer.models import Statement
from mailer.statements import sanitize_html
from mailer.tokens import MessageIds
from mailer.wire import (
    ADDRESS,
    CRLF,
    MESSAGE_ID,
    PRINTABLE,
    URL,
    Stuffed,
    WireForm,
    check,
    clean_header_text,
    crlf,
    date_header,
    duration,
    idna_address,
    line_value,
    mailbox,
    multipart,
    part_header,
    phrase,
    qp,
    qp_joints,
    unstructured,
    wire_form,
)

TEST_SUBJECT_PREFIX = "[TEST] "
TEST_HEADER = b"X-Mailer-Test: yes\r\n"
PREVIEW_UNSUBSCRIBE_URL = "#unsubscribe-preview"


def make_message_id(settings: Settings, blast_id: int | None, subscriber_id: int | None) -> str:
    """A blast's delivery gets the same Message-ID on every attempt, so a copy repeated
    after a worker crash can be deduplicated by the receiver (Gmail does); the HMAC
    (128 bits, under the Message-ID sub-key, docs/security.md) keeps subscriber ids
    private. Anything else gets a random one."""
    if blast_id is not None and subscriber_id is not None:
        return message_ids(settings)(blast_id, subscriber_id)
    domain = settings.sender_domain.encode("idna").decode()
    return f"<{time.time_ns():x}.{secrets.token_hex(8)}@{domain}>"


def message_ids(settings: Settings, key: str | None = None) -> MessageIds:
    """Message-IDs of blast deliveries under ``key`` (the current key if None)."""
    domain = settings.sender_domain.encode("idna").decode()
    return MessageIds(key or settings.signing_keys[-1], domain)


def _legacy_message_id_mac(key: str, blast_id: int, subscriber_id: int) -> str:
    """Message-IDs mailed before the sub-key: 96 bits under the secret key itself."""
    message = f"msgid:{blast_id}:{subscriber_id}".encode()
    return hmac.new(key.encode(), message, "sha256").hexdigest()[:24]


# 32 hex digits: the current form; 24: mailed before it (their bounces still arrive).
BLAST_MESSAGE_ID = re.compile(r"<b(\d{1,18})\.([0-9a-f]{32}|[0-9a-f]{24})@[^<>\s]{1,255}>")


def read_message_id(settings: Settings, message_id: str, subscriber_id: int) -> int | None:
    """The blast id in a Message-ID made by :func:`make_message_id` for ``subscriber_id``
    (or by the code before it), or None unless its HMAC verifies (under any accepted
    key). The HMAC binds blast and subscriber, so a bounce or complaint carrying it
    proves both."""
    match = BLAST_MESSAGE_ID.fullmatch(message_id.strip())
    if match is None:
        return None
    blast_id, given = int(match.group(1)), match.group(2).encode()
    for key in settings.signing_keys:
        if len(given) == 32:
            expected = message_ids(settings, key).mac(blast_id, subscriber_id)
        else:
            expected = _legacy_message_id_mac(key, blast_id, subscriber_id)
        if hmac.compare_digest(expected.encode(), given):
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


class _Values(NamedTuple):
    """One recipient's values, checked and encoded as the message carries them."""

    address: bytes
    date: bytes
    message_id: bytes
    url: bytes
    text_url: bytes  # quoted-printable, for the text part
    html_url: bytes  # HTML-escaped, then quoted-printable, for the HTML part


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
    _wire: WireForm

    def _values(self, to: str, unsubscribe_url: str, message_id: str, date: str | None) -> _Values:
        """The recipient's values, checked: a ValueError for any that could break out of
        its header line, or a URL too long for the List-Unsubscribe line."""
        url = check(URL, unsubscribe_url, "unsubscribe URL")
        if len(url) > self._url_max:
            raise ValueError("unsubscribe URL too long for a single List-Unsubscribe line")
        return _Values(
            check(ADDRESS, to, "recipient address"),
            check(PRINTABLE, date, "date") if date is not None else date_header(int(time.time())),
            check(MESSAGE_ID, message_id, "Message-ID"),
            url,
            qp(url),
            qp(str(escape(unsubscribe_url)).encode()),
        )

    def build(
        self, *, to: str, unsubscribe_url: str, message_id: str, date: str | None = None
    ) -> bytes:
        """The full RFC 5322 message (CRLF, ASCII) for one recipient, ready for DATA.

        Raises ValueError for any value that could break out of its header line."""
        v = self._values(to, unsubscribe_url, message_id, date)
        return b"".join(
            (
                self._head,
                b"To: ",
                v.address,
                b"\r\nDate: ",
                v.date,
                b"\r\nMessage-ID: ",
                v.message_id,
                b"\r\nList-Unsubscribe: <",
                v.url,
                self._tail,
                v.text_url.join(self._text),
                self._middle,
                v.html_url.join(self._html),
                self._end,
            )
        )

    def wire(
        self, *, to: str, unsubscribe_url: str, message_id: str, date: str | None = None
    ) -> Stuffed:
        """The same message as :meth:`build`, in the form it follows DATA.

        Byte for byte what ``smtp_pipeline.wire_message`` makes of ``build``'s result
        (tests/test_wire_form.py), but only the recipient's values are looked at here:
        the shared parts were converted once, in ``wire.wire_form``. The values cannot
        break that: the header values match patterns without CR or LF, and a
        quoted-printable URL has no line ends but its soft breaks (CRLF), after which a
        leading dot is doubled like any other."""
        v = self._values(to, unsubscribe_url, message_id, date)
        w = self._wire
        size = w.size + len(v.address) + len(v.date) + len(v.message_id) + len(v.url)
        size += len(v.text_url) * (len(w.text) - 1) + len(v.html_url) * (len(w.html) - 1)
        return Stuffed(
            b"".join(
                (
                    w.to,
                    v.address,
                    w.date,
                    v.date,
                    w.message_id,
                    v.message_id,
                    w.unsubscribe,
                    v.url,
                    line_value(v.text_url).join(w.text),
                    line_value(v.html_url).join(w.html),
                )
            ),
            size,
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
        self._from = b"From: " + mailbox(settings.from_name, settings.from_address) + CRLF
        list_id = settings.list_id.encode("idna")
        feedback = b""
        if settings.feedback_id:
            feedback = b"Feedback-ID: " + check(PRINTABLE, settings.feedback_id, "feedback ID")
            feedback += CRLF
        # The rest of the List-Unsubscribe line, then the list headers every statement has.
        self._list_tail = b"".join(
            (
                b">, <mailto:" + idna_address(settings.from_address) + b"?subject=unsubscribe>",
                b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
                b"List-Id: " + phrase(settings.list_name) + b" <" + list_id + b">\r\n",
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
        head = b"".join((self._from, unstructured("Subject", subject), b"MIME-Version: 1.0\r\n"))
        tail = self._list_tail + (TEST_HEADER if test else b"") + multipart(boundary)
        tail += part_header(boundary, b"plain")
        text_joints, middle, html_joints = (
            qp_joints(text),
            CRLF + part_header(boundary, b"html"),
            qp_joints(html),
        )
        end = b"\r\n--" + boundary + b"--\r\n"
        return CompiledMessage(
            blast_id,
            clean_header_text(subject),
            head,
            tail,
            text_joints,
            middle,
            html_joints,
            end,
            998 - len(b"List-Unsubscribe: <") - len(tail.split(CRLF, 1)[0]),
            wire_form(head, tail, text_joints, middle, html_joints, end),
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
        check(ADDRESS, to, "recipient address")
        check(URL, confirm_url, "confirmation URL")
        s = self.settings
        context = {
            "confirm_url": confirm_url,
            "list_name": s.list_name,
            "site_host": s.public_host,
            "valid_for": duration(s.confirm_token_ttl_s),
        }
        text = self.env.get_template("email/confirm.txt").render(context)
        html = self._html("email/confirm.html", context)
        boundary = f"=_m{secrets.token_hex(12)}".encode()
        return b"".join(
            (
                self._from,
                b"To: " + mailbox(None, to) + CRLF,
                unstructured("Subject", f"Confirm your subscription to {s.list_name}"),
                b"Date: " + date_header(int(time.time())) + CRLF,
                b"Message-ID: " + make_message_id(s, None, None).encode() + CRLF,
                b"MIME-Version: 1.0\r\n",
                multipart(boundary),
                part_header(boundary, b"plain"),
                qp(crlf(text).encode()),
                CRLF + part_header(boundary, b"html"),
                qp(crlf(html).encode()),
                b"\r\n--" + boundary + b"--\r\n",
            )
        )

    def notice(
        self, *, to: str, subject: str, template: str, context: Mapping[str, object]
    ) -> bytes:
        """A transactional mail to an editor (``email/<template>.txt`` and ``.html``): no
        list headers, as it goes to the team, not to subscribers."""
        check(ADDRESS, to, "recipient address")
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
                b"To: " + mailbox(None, to) + CRLF,
                unstructured("Subject", subject),
                b"Date: " + date_header(int(time.time())) + CRLF,
                b"Message-ID: " + make_message_id(self.settings, None, None).encode() + CRLF,
                b"MIME-Version: 1.0\r\n",
                multipart(boundary),
                part_header(boundary, b"plain"),
                qp(crlf(text).encode()),
                CRLF + part_header(boundary, b"html"),
                qp(crlf(html).encode()),
                b"\r\n--" + boundary + b"--\r\n",
            )
        )
