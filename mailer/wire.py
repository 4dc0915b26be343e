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
