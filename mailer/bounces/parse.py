"""Raw RFC 5322 bytes → a typed report: DSN, ARF complaint, free-text bounce, or other.

Everything here is hostile input: anyone can mail the bounce address. So the
parser never raises (a message it cannot make sense of becomes ``other`` with
the reason), reads at most :data:`MAX_BYTES` of a message (a DSN that returns a
20 MB attachment still has its report and the original headers in the first
kilobytes), and keeps at most :data:`MAX_RECIPIENTS` recipient blocks, saying
so in ``notes``. It only *reads*; who the report is about is decided in
``identify.py`` from signed values, never from the addresses found here.

``compat32`` is the parsing policy on purpose: the modern policy builds typed
header objects whose parsers have raised on malformed addresses and 8-bit
bytes; compat32 keeps raw strings, which :func:`_text` cleans. Formats:
RFC 3464 (DSN), RFC 5965 (ARF), RFC 3462 (multipart/report); docs/bounces.md.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.policy import compat32
from enum import StrEnum

MAX_BYTES = 2 * 1024 * 1024  # of a message parsed; the rest is only counted
MAX_RECIPIENTS = 100  # recipient blocks of a DSN looked at
MAX_PARTS = 64  # MIME parts walked
MAX_TEXT = 64 * 1024  # characters of a human-readable part searched for codes
MAX_FIELD = 1000  # characters kept of any header or report field

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_REPLY = re.compile(r"(?<![\d.])([245]\d\d)(?:[ -]|$)")
_PROSE_REPLY = re.compile(r"(?<![\d.])([45]\d\d)(?:[ -]|$)")
_DELAYED = re.compile(r"\bdelay(ed)?\b|will (be )?retr(y|ied)|still (being )?(tried|retried)", re.I)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_BLANK_LINE = re.compile(r"\r?\n[ \t]*\r?\n")
_DAEMON = re.compile(r"\b(mailer-daemon|postmaster|mail-daemon|mailerdaemon)@", re.I)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|returned mail|returned to sender|delivery (status notification|failure|failed"
    r"|has failed|problem|notification)|mail delivery (failed|failure|subsystem)|failure notice"
    r"|non[- ]?delivery|could not be delivered|delayed mail|warning: message .* delayed",
    re.I,
)
_AUTO_REPLY_SUBJECT = re.compile(
    r"out of (the )?office|automatic reply|auto[- ]?(reply|response|matische antwort)"
    r"|autoresponder|vacation|abwesenheit|absence|away from",
    re.I,
)
_MESSAGE_ID_LINE = re.compile(r"^message-id:[ \t]*(<[^<>\s]{1,300}>)", re.I | re.M)
_LIST_UNSUB_LINE = re.compile(r"^list-unsubscribe:[ \t]*((?:.*)(?:\r?\n[ \t]+.*)*)", re.I | re.M)


class ReportType(StrEnum):
    dsn = "dsn"  # RFC 3464 multipart/report; report-type=delivery-status
    arf = "arf"  # RFC 5965 multipart/report; report-type=feedback-report
    text = "text"  # a bounce in prose only (older Exim, qmail, some appliances)
    other = "other"  # auto-replies, out-of-office, anything else


@dataclass(frozen=True)
class RecipientStatus:
    """One per-recipient block of a DSN (or what a free-text bounce says)."""

    final_recipient: str | None = None
    original_recipient: str | None = None
    action: str | None = None  # failed, delayed, delivered, relayed, expanded
    status: str | None = None  # enhanced status code, e.g. 5.1.1
    code: int | None = None  # SMTP reply code from Diagnostic-Code, e.g. 550
    diagnostic: str | None = None


@dataclass(frozen=True)
class OriginalHeaders:
    """The headers of the message the report is about, when the report carries them."""

    message_id: str | None = None
    list_unsubscribe: str | None = None
    to: str | None = None


@dataclass
class Report:
    type: ReportType
    raw_size: int
    digest: str  # what makes two copies of this report the same report
    readable: bool = True  # False: not an email message at all (no header fields)
    recipients: list[RecipientStatus] = field(default_factory=list)
    recipients_total: int = 0
    feedback_type: str | None = None
    original: OriginalHeaders | None = None
    subject: str = ""
    sender: str = ""
    delivered_to: str | None = None  # topmost Delivered-To / X-Original-To, if any
    why: str = ""  # for ``other``: why it is not a bounce or complaint
    notes: list[str] = field(default_factory=list)


def parse(raw: bytes, *, raw_size: int | None = None) -> Report:
    """Read one message; never raises. ``raw_size``: the full size when ``raw`` was capped."""
    size = len(raw) if raw_size is None else raw_size
    notes: list[str] = []
    if len(raw) > MAX_BYTES:
        raw = raw[:MAX_BYTES]
    if size > len(raw):
        notes.append(f"only the first {len(raw)} of {size} bytes read")
    digest = _digest(raw)
    try:
        return _parse(raw, size, digest, notes)
    except Exception as exc:  # noqa: BLE001 - hostile input must never raise out of here
        return Report(ReportType.other, size, digest, why=f"unparseable ({type(exc).__name__})")


def _digest(raw: bytes) -> str:
    """The report's own Message-ID and body, line endings normalised: the same DSN piped by
    Postfix (LF) and received over SMTP (CRLF), with different Received lines, is one."""
    data = raw.replace(b"\r\n", b"\n")
    head, _, body = data.partition(b"\n\n")
    match = re.search(rb"^message-id:[ \t]*(\S{1,300})", head, re.I | re.M)
    own_id = match.group(1) if match else b""
    return hashlib.sha256(own_id + b"\0" + body).hexdigest()


def _text(value: object, limit: int = MAX_FIELD) -> str:
    """A header or field value as clean one-line text: encoded-words decoded, 8-bit bytes
    read as UTF-8 (replacement characters otherwise), controls and folding collapsed."""
    if value is None:
        return ""
    text = str(value)
    if "=?" in text:
        try:
            text = str(make_header(decode_header(text)))
        except Exception:  # noqa: BLE001, S110 - a broken encoded-word stays as it was
            pass
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return " ".join(_CONTROL.sub(" ", text).split())[:limit]


def _header(msg: Message, name: str) -> str:
    try:
        return _text(msg.get(name))
    except Exception:  # noqa: BLE001
        return ""


def _parts(msg: Message) -> list[Message]:
    """Every part, depth first, at most MAX_PARTS (walk() has no limit)."""
    out: list[Message] = []
    stack = [msg]
    while stack and len(out) < MAX_PARTS:
        part = stack.pop()
        out.append(part)
        payload = part.get_payload()
        if isinstance(payload, list) and not part.get_content_type().endswith("delivery-status"):
            stack.extend(reversed([p for p in payload if isinstance(p, Message)]))
    return out


def _decoded(part: Message, limit: int = MAX_TEXT) -> str:
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        payload = part.get_payload()
        return payload[:limit] if isinstance(payload, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data[: limit * 4].decode(charset, "replace")[:limit]
    except LookupError:
        return data[: limit * 4].decode("utf-8", "replace")[:limit]


def _field_blocks(part: Message) -> list[dict[str, str]]:
    """The header-like blocks of a message/delivery-status or message/feedback-report part.

    The stdlib parses delivery-status into a list of header sets; other types, or a part
    sent with a content-transfer-encoding, arrive as text that is split here."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [
            {k.lower(): _text(v) for k, v in block.items()}
            for block in payload
            if isinstance(block, Message)
        ]
    blocks = []
    for chunk in _BLANK_LINE.split(_decoded(part, MAX_BYTES)):
        fields = HeaderParser(policy=compat32).parsestr(chunk.strip() + "\n")
        if fields.keys():
            blocks.append({k.lower(): _text(v) for k, v in fields.items()})
    return blocks


def _address(value: str) -> str | None:
    """``rfc822; Bob@Example.com`` → ``bob@example.com`` (for display and candidates)."""
    value = value.split(";", 1)[1] if ";" in value else value
    value = value.strip().strip("<>").strip().lower()
    return value[:320] or None


def recipient_from_fields(fields: dict[str, str]) -> RecipientStatus:
    diagnostic = fields.get("diagnostic-code", "")
    if ";" in diagnostic[:20]:  # "smtp; 550 ..." / "X-Postfix; ..."
        diagnostic = diagnostic.split(";", 1)[1].strip()
    status = _ENHANCED.search(fields.get("status", ""))
    reply = _REPLY.match(diagnostic)
    return RecipientStatus(
        final_recipient=_address(fields.get("final-recipient", "")),
        original_recipient=_address(fields.get("original-recipient", "")),
        action=next(iter(fields.get("action", "").lower().split()), None),
        status=status.group(0) if status else None,
        code=int(reply.group(1)) if reply else None,
        diagnostic=diagnostic[:500] or None,
    )


def _original(parts: list[Message], text: str) -> OriginalHeaders | None:
    """The original message's headers: an attached message/rfc822 or text/rfc822-headers
    part, else ``Message-ID:`` / ``List-Unsubscribe:`` lines quoted in the prose."""
    for part in parts[1:]:
        ctype = part.get_content_type()
        headers: Message | None = None
        if ctype in ("message/rfc822", "message/global"):
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                headers = inner[0]
        elif ctype in ("text/rfc822-headers", "message/rfc822-headers", "message/global-headers"):
            headers = HeaderParser(policy=compat32).parsestr(_decoded(part, MAX_TEXT).lstrip())
        if headers is not None and headers.keys():
            return OriginalHeaders(
                message_id=_header(headers, "Message-ID") or None,
                list_unsubscribe=_header(headers, "List-Unsubscribe") or None,
                to=_header(headers, "To") or None,
            )
    message_id = _MESSAGE_ID_LINE.search(text)
    unsubscribe = _LIST_UNSUB_LINE.search(text)
    if message_id is None and unsubscribe is None:
        return None
    return OriginalHeaders(
        message_id=message_id.group(1) if message_id else None,
        list_unsubscribe=_text(unsubscribe.group(1)) if unsubscribe else None,
    )


def _first_text(parts: list[Message]) -> str:
    for part in parts:
        if part.get_content_type() == "text/plain" and not part.is_multipart():
            return _decoded(part)
    return ""


def _parse(raw: bytes, size: int, digest: str, notes: list[str]) -> Report:
    msg = BytesParser(policy=compat32).parsebytes(raw)
    report = Report(ReportType.other, size, digest, notes=notes)
    if not msg.keys():
        report.readable = False
        report.why = "no header fields: not an email message"
        return report
    report.subject = _header(msg, "Subject")[:200]
    report.sender = _header(msg, "From")[:200]
    report.delivered_to = (
        _address(_header(msg, "Delivered-To") or _header(msg, "X-Original-To")) or None
    )
    if msg.defects:
        notes.append(f"{len(msg.defects)} MIME defect(s)")
    parts = _parts(msg)
    if len(parts) >= MAX_PARTS:
        notes.append(f"only the first {MAX_PARTS} MIME parts read")
    ctype = msg.get_content_type()
    report_type = str(msg.get_param("report-type", "") or "").lower()
    types = {p.get_content_type(): p for p in reversed(parts)}
    status_part = types.get("message/delivery-status") or types.get(
        "message/global-delivery-status"
    )
    if report_type == "feedback-report" or "message/feedback-report" in types:
        _read_arf(report, parts, types.get("message/feedback-report"))
    elif report_type == "delivery-status" or status_part is not None:
        _read_dsn(report, parts, status_part)
    elif ctype == "multipart/report":
        report.why = f"a report of type {report_type or 'unknown'!r}, not a DSN or complaint"
    else:
        _read_prose(report, msg, parts)
    return report


def _read_arf(report: Report, parts: list[Message], part: Message | None) -> None:
    report.type = ReportType.arf
    fields: dict[str, str] = {}
    for block in _field_blocks(part) if part is not None else []:
        fields.update(block)
    report.feedback_type = (fields.get("feedback-type", "").split() or ["abuse"])[0].lower()
    if part is None:
        report.notes.append("no message/feedback-report part: taken as abuse")
    report.original = _original(parts, _first_text(parts))
    recipient = _address(fields.get("original-rcpt-to", "")) if fields else None
    if recipient:
        report.recipients = [RecipientStatus(final_recipient=recipient)]
        report.recipients_total = 1


def _read_dsn(report: Report, parts: list[Message], part: Message | None) -> None:
    report.type = ReportType.dsn
    blocks = _field_blocks(part) if part is not None else []
    recipients = [b for b in blocks if "final-recipient" in b or "action" in b or "status" in b]
    report.recipients_total = len(recipients)
    if len(recipients) > MAX_RECIPIENTS:
        report.notes.append(
            f"{len(recipients)} recipient blocks, only the first {MAX_RECIPIENTS} read"
        )
    report.recipients = [recipient_from_fields(b) for b in recipients[:MAX_RECIPIENTS]]
    if not report.recipients:
        # A DSN whose status part is missing or empty: fall back to its prose.
        report.notes.append("no recipient block in the delivery-status part")
        text = _first_text(parts)
        report.recipients = [_prose_status(text)]
        report.recipients_total = 1
    report.original = _original(parts, _first_text(parts))


def _prose_status(text: str) -> RecipientStatus:
    """What a bounce written in prose says: the first line with a 4xx/5xx reply code."""
    delayed = bool(_DELAYED.search(text))
    for line in text.splitlines():
        reply = _PROSE_REPLY.search(line)
        if reply is None:
            continue
        code = int(reply.group(1))
        enhanced = _ENHANCED.search(line)
        return RecipientStatus(
            action="delayed" if delayed and code < 500 else None,
            status=enhanced.group(0) if enhanced else None,
            code=code,
            diagnostic=_text(line, 500),
        )
    excerpt = _text(text[:2000], 500)
    return RecipientStatus(action="delayed" if delayed else None, diagnostic=excerpt or None)


def _read_prose(report: Report, msg: Message, parts: list[Message]) -> None:
    auto = _header(msg, "Auto-Submitted").lower()
    daemon = bool(_DAEMON.search(report.sender)) or report.sender.lower().startswith(
        ("mailer-daemon", "postmaster")
    )
    bounce_subject = bool(_BOUNCE_SUBJECT.search(report.subject))
    auto_reply = (
        bool(_AUTO_REPLY_SUBJECT.search(report.subject))
        or any(
            _header(msg, h) for h in ("X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress")
        )
        or _header(msg, "Precedence").lower() == "auto_reply"
    )
    if (daemon or bounce_subject) and not (auto_reply and not daemon):
        report.type = ReportType.text
        text = report.subject + "\n" + _first_text(parts)
        report.recipients = [_prose_status(text)]
        report.recipients_total = 1
        report.original = _original(parts, text)
        return
    if auto_reply or auto.startswith("auto-replied"):
        report.why = "an auto-reply (out of office or similar)"
    elif auto.startswith("auto-"):
        report.why = f"automatic mail ({auto.split(';')[0]})"
    else:
        report.why = "not a bounce or complaint"
