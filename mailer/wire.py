"""Bytes on the wire: header encoding, quoted-printable, MIME part boundaries.

Every header is written by hand because Python's email policies fold long headers
into RFC 2047 encoded-words, which Gmail rejects in List-Unsubscribe
(docs/design.md). ``render.py`` uses these to build each message once per blast and
splice the per-recipient values into it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from dataclasses import dataclass
from email.utils import formatdate

CRLF = b"\r\n"
SOFT_BREAK = b"=\r\n"
QP_LINE = 76

ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9.-]{1,253}")
# RFC 3986 characters minus the comma, which would split the List-Unsubscribe list.
URL = re.compile(r"https?://[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+;=%]+")
MESSAGE_ID = re.compile(r"<[!-;=?-~]+@[!-;=?-~]+>")
PRINTABLE = re.compile(r"[ -~]{1,100}")
# C0/C1 controls and Unicode line separators: anything a header parser might treat
# as a line break becomes a plain space.
TO_SPACE = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029], " ")


# Header text ----------------------------------------------------------------------


def clean_header_text(text: str) -> str:
    """One line of text: control characters become spaces, runs of whitespace (NBSP
    too, which parsers treat inconsistently) collapse to one space.
    This is also what a test should expect a Subject or display name to decode to."""
    return " ".join(text.translate(TO_SPACE).split())


def encoded_words(text: str) -> bytes:
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


def needs_encoding(text: str) -> bool:
    return not text.isascii() or "=?" in text


def unstructured(name: str, text: str) -> bytes:
    """A header line for free text (Subject): plain ASCII folded at spaces, anything
    else as encoded-words."""
    text = clean_header_text(text)
    if needs_encoding(text):
        return name.encode() + b": " + encoded_words(text) + CRLF
    lines: list[str] = [f"{name}:"]
    for word in text.split(" "):
        if len(lines[-1]) + 1 + len(word) > 78 and lines[-1] != f"{name}:":
            lines.append("")
        lines[-1] += " " + word
    return "\r\n".join(lines).encode() + CRLF


def phrase(text: str) -> bytes:
    """A display name: a quoted-string when ASCII, encoded-words otherwise."""
    text = clean_header_text(text)
    if needs_encoding(text):
        return encoded_words(text)
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'


def mailbox(name: str | None, address: str) -> bytes:
    """``"Name" <address>``, or the bare address when there is no name."""
    addr = idna_address(address)
    if not clean_header_text(name or ""):
        return addr
    words = phrase(name or "")
    last_line = len(words) - words.rfind(b"\n") + len("From: ")
    return words + (b"\r\n <" if last_line + len(addr) > 75 else b" <") + addr + b">"


def idna_address(address: str) -> bytes:
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.encode('idna').decode()}".encode()


def check(pattern: re.Pattern[str], value: str, what: str) -> bytes:
    if not pattern.fullmatch(value):
        raise ValueError(f"invalid {what} for a mail header: {value[:200]!r}")
    return value.encode()


# Quoted-printable segments ------------------------------------------------------


def crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")


def qp(data: bytes) -> bytes:
    """b2a_qp (C, fast) with CRLF soft breaks, and room left on the last line for the
    ``=`` of the soft break that the splice appends."""
    encoded = binascii.b2a_qp(data)
    if b"\n" not in data:  # b2a_qp only writes CRLF when the input used it
        encoded = encoded.replace(b"=\n", SOFT_BREAK)
    start = encoded.rfind(b"\n") + 1
    if len(encoded) - start >= QP_LINE:
        cut = start + QP_LINE - 1
        if encoded[cut - 1 : cut] == b"=":
            cut -= 1
        elif encoded[cut - 2 : cut - 1] == b"=":
            cut -= 2
        encoded = encoded[:cut] + SOFT_BREAK + encoded[cut:]
    return encoded


def qp_joints(segments: list[str]) -> list[bytes]:
    """Encoded segments, each glued to its neighbours' values by soft line breaks, for
    ``value.join(joints)``."""
    joints: list[bytes] = []
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        encoded = qp(crlf(segment).encode())
        head = SOFT_BREAK if i > 0 and (encoded or i < last) else b""
        tail = SOFT_BREAK if i < last and encoded and not encoded.endswith(CRLF) else b""
        joints.append(head + encoded + tail)
    return joints


def part_header(boundary: bytes, subtype: bytes) -> bytes:
    return (
        b"--" + boundary + b"\r\nContent-Type: text/" + subtype + b'; charset="utf-8"\r\n'
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    )


def multipart(boundary: bytes) -> bytes:
    return b'Content-Type: multipart/alternative; boundary="' + boundary + b'"\r\n\r\n'


def duration(seconds: int) -> str:
    """How long the confirmation link works, as people say it: "7 days", "36 hours"."""
    units = (("day", 86400), ("hour", 3600))
    unit, size = next(((u, n) for u, n in units if seconds >= 2 * n), ("minute", 60))
    count = max(seconds // size, 1)
    return f"{count} {unit}{'s' if count != 1 else ''}"


@functools.lru_cache(maxsize=2)
def date_header(second: int) -> bytes:
    """formatdate() costs a few µs; one string per second is plenty for a Date header.
    "+0000" rather than the obsolete "GMT" zone of RFC 5322."""
    return formatdate(second, usegmt=True).removesuffix("GMT").encode() + b"+0000"


# The DATA form ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stuffed:
    """A message in the form it follows DATA: CRLF line ends, every line that starts
    with ``.`` given a second one, and the final ``.\r\n`` (RFC 5321 4.5.2).

    ``render.py`` builds a blast's messages in this form directly (the shared parts are
    converted once per blast), so the SMTP code sends ``data`` as it is instead of
    scanning and copying every 6.7 KB message again. ``size`` is RFC 1870's SIZE: the
    message before the stuffing, without the final dot.
    """

    data: bytes
    size: int

    def plain(self) -> bytes:
        """The message itself, for the paths that stuff it on their own (aiosmtplib's
        ``sendmail``, DKIM signing): stuffing only ever doubles a dot at a line start,
        so removing one there undoes it exactly."""
        message = self.data[:-3].replace(b"\n..", b"\n.")
        return message[1:] if message[:2] == b".." else message


def crlf_bytes(data: bytes) -> bytes:
    """CRLF line ends, bare CR and bare LF each becoming one, as aiosmtplib does; for a
    whole message (``smtp_pipeline.wire_message``) or a part of one (:func:`wire_form`).
    Counting first: a message that is already CRLF (render.py's) is not copied."""
    count = data.count(b"\r\n")
    if data.count(b"\n") != count or data.count(b"\r") != count:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return data


def stuff(data: bytes, *, line_start: bool) -> bytes:
    """Dot-stuffing of a CRLF message or part of one; ``line_start``: it begins a line."""
    if b"\n." in data:  # a scan, and no copy for the many messages without one
        data = data.replace(b"\n.", b"\n..")
    return b"." + data if line_start and data[:1] == b"." else data


def line_value(value: bytes) -> bytes:
    """A quoted-printable value that starts a line (it follows a soft break or a CRLF),
    stuffed. Its soft breaks are its only line ends (it is encoded from one line, see
    :func:`qp`). A URL starts with "http" and its encoding never ends with a line end,
    so a value that does either is refused rather than spliced: :func:`wire_form`'s
    parts were stuffed on the understanding that they do not start a line."""
    if value[:1] == b"." or value[-1:] in (b"\r", b"\n"):
        raise ValueError("a value that would start a line with a dot or end one")
    return value.replace(b"\n.", b"\n..") if b"\n." in value else value


@dataclass(frozen=True, slots=True)
class WireForm:
    """A compiled message's shared parts in the DATA form (see :class:`Stuffed`), cut
    where ``render.CompiledMessage.wire`` puts the recipient's values."""

    to: bytes  # the headers up to "To: "
    date: bytes
    message_id: bytes
    unsubscribe: bytes
    text: list[bytes]  # joined by the URL in the text part; the last one ends the part
    html: list[bytes]  # joined by the URL in the HTML part; the last one has the final dot
    size: int  # the SIZE of these parts, before stuffing


def wire_form(
    head: bytes, tail: bytes, text: list[bytes], middle: bytes, html: list[bytes], end: bytes
) -> WireForm:
    """Line ends and dot-stuffing for the parts every recipient shares, once per blast.

    Each part is converted on its own, which gives what converting the whole message
    gives: a header value spliced between two parts holds no CR or LF, and a URL's
    quoted-printable form only CRLFs inside it (:func:`line_value`), so no CRLF is cut
    in two, every LF in a part ends a line and no part after a value starts a line. The
    only parts that meet without a value between them are the end of the text part
    (which ends with the HTML part's header, a CRLF) and the start of the HTML part,
    which is told that it starts a line."""
    fixed = [head + b"To: ", b"\r\nDate: ", b"\r\nMessage-ID: ", b"\r\nList-Unsubscribe: <"]
    texts = [tail + text[0], *text[1:-1], text[-1] + middle]
    htmls = [html[0], *html[1:-1], html[-1] + end]
    fixed, texts, htmls = ([crlf_bytes(p) for p in parts] for parts in (fixed, texts, htmls))
    if not htmls[-1].endswith(CRLF):
        htmls[-1] += CRLF
    size = sum(len(p) for parts in (fixed, texts, htmls) for p in parts)
    to, date, message_id, unsubscribe = (stuff(p, line_start=p is fixed[0]) for p in fixed)
    first_html = stuff(htmls[0], line_start=texts[-1].endswith(b"\n"))
    htmls = [first_html] + [stuff(p, line_start=False) for p in htmls[1:]]
    htmls[-1] += b".\r\n"
    texts = [stuff(p, line_start=False) for p in texts]
    return WireForm(to, date, message_id, unsubscribe, texts, htmls, size)
