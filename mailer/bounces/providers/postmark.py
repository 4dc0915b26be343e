"""Postmark bounce and spam-complaint webhooks, authenticated by HTTP basic auth.

Postmark does not sign its webhooks; it sends the credentials written into the webhook
URL (``https://USER:PASSWORD@host/webhooks/postmark``) as HTTP basic auth. Both halves
are compared in constant time, always both, so the answer's timing says nothing about
which half was wrong. No credentials: 401 with a ``Basic`` challenge; wrong ones: 403;
not configured: 404.

One record per POST. ``RecordType`` ``Bounce`` maps by its ``Type``: ``HardBounce`` and
``BadEmailAddress`` → hard; ``SoftBounce``, ``Transient``, ``DnsError``, ``Unknown`` →
soft; ``Blocked``, ``SpamNotification``, ``VirusNotification``, ``DMARCPolicy`` → policy
(the sender's problem, docs/bounces.md); ``SpamComplaint`` → complaint; the rest
(auto-replies, address changes, challenge mails, …) are stored as ignored. ``RecordType``
``SpamComplaint`` is a complaint; deliveries, opens, clicks and subscription changes are
skipped. Hard and soft are refined by the SMTP text in ``Details`` (``common.refine``).

Postmark's ``MessageID`` is its own id, not our header; when the record carries the bounce
``Content``, the original ``Message-ID`` and ``List-Unsubscribe`` found in it identify
subscriber and blast. Otherwise the recipient ``Email`` does.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Mapping

from mailer.bounces.providers import common
from mailer.bounces.providers.common import Received, Rejected, Reported, text
from mailer.config import Settings
from mailer.models import BounceKind
from mailer.render import BLAST_MESSAGE_ID

PROVIDER = "postmark"
MAX_BYTES = 512 * 1024  # one record; its Content (the bounce itself) is the large part
CHALLENGE = {"WWW-Authenticate": 'Basic realm="mailer webhooks", charset="UTF-8"'}
BOUNCE_TYPES = {
    "HardBounce": BounceKind.hard,
    "BadEmailAddress": BounceKind.hard,
    "SoftBounce": BounceKind.soft,
    "Transient": BounceKind.soft,
    "DnsError": BounceKind.soft,
    "Unknown": BounceKind.soft,
    "Blocked": BounceKind.policy,
    "SpamNotification": BounceKind.policy,
    "VirusNotification": BounceKind.policy,
    "DMARCPolicy": BounceKind.policy,
    "SpamComplaint": BounceKind.complaint,
}
SKIPPED = {"Delivery", "Open", "Click", "SubscriptionChange"}
_HEADER = r"^{name}:[ \t]*((?:.*)(?:\r?\n[ \t]+.*)*)"
_MESSAGE_ID = re.compile(_HEADER.format(name="Message-ID"), re.I | re.M)
_LIST_UNSUBSCRIBE = re.compile(_HEADER.format(name="List-Unsubscribe"), re.I | re.M)


def authenticate(settings: Settings, authorization: str | None) -> None:
    """Return when the request carries the configured basic-auth credentials."""
    user, password = settings.postmark_webhook_user, settings.postmark_webhook_password
    if user is None or password is None:
        raise Rejected(
            404,
            "the Postmark webhook is disabled: set MAILER_POSTMARK_WEBHOOK_USER "
            "and MAILER_POSTMARK_WEBHOOK_PASSWORD",
        )
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        raise Rejected(401, "HTTP basic auth required (credentials in the webhook URL)", CHALLENGE)
    try:
        given = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(401, "malformed basic auth credentials", CHALLENGE) from None
    given_user, colon, given_password = given.partition(b":")
    user_ok = hmac.compare_digest(given_user, user.encode())
    password_ok = hmac.compare_digest(given_password, password.get_secret_value().encode())
    if not (colon and user_ok and password_ok):
        raise Rejected(403, "wrong webhook credentials")


def receive(body: bytes) -> Received:
    """Map one authenticated Postmark record."""
    record = common.parse_json(body)
    if not isinstance(record, dict):
        raise Rejected(400, "expected a JSON object (one Postmark webhook record)")
    record_type = text(record, "RecordType", 40) or ""
    if record_type in SKIPPED:
        return Received([], skipped=1)
    if record_type == "SpamComplaint":
        return Received([_event(record, BounceKind.complaint, "SpamComplaint", len(body))])
    if record_type != "Bounce":
        why = f"Postmark record type {record_type or '(none)'!r}"
        return Received([_event(record, BounceKind.ignored, why, len(body))])
    bounce_type = text(record, "Type", 40) or ""
    base = BOUNCE_TYPES.get(bounce_type)
    if base is None:
        why = f"Postmark bounce type {bounce_type or '(none)'!r} is not about the address"
        return Received([_event(record, BounceKind.ignored, why, len(body))])
    return Received([_event(record, base, bounce_type, len(body))])


def _event(record: Mapping[str, object], kind: BounceKind, what: str, size: int) -> Reported:
    details = text(record, "Details", 500)
    status = common.enhanced(details)
    code = common.smtp_code(details)
    kind = common.refine(kind, status=status, code=code, diagnostic=details)
    content = text(record, "Content", 200_000) or ""
    record_id = text(record, "ID", 40) or ""
    key = (
        (text(record, "RecordType", 40) or "", record_id)
        if record_id
        else (what, text(record, "MessageID", 100) or "", text(record, "Email", 320) or "")
    )
    return common.reported(
        PROVIDER,
        kind,
        key=key,
        email=text(record, "Email", 320),
        status=status,
        code=code,
        diagnostic=details or text(record, "Description", 500),
        note=f"Postmark {what}",
        raw_size=size,
        message_id=_ours(content),
        list_unsubscribe=_first(_LIST_UNSUBSCRIBE, content),
    )


def _ours(content: str) -> str | None:
    """Our Message-ID among those in the bounce content (the bounce has its own first)."""
    for match in _MESSAGE_ID.finditer(content):
        found = BLAST_MESSAGE_ID.search(match.group(1))
        if found:
            return found.group(0)
    return None


def _first(pattern: re.Pattern[str], content: str) -> str | None:
    match = pattern.search(content)
    return " ".join(match.group(1).split())[:2000] if match else None
