"""SendGrid's signed event webhook: ECDSA P-256 with SHA-256 over timestamp + raw body.

With "Signed Event Webhook Requests" on, SendGrid signs each POST with a private key
whose public half it shows in its settings (base64 DER, ``MAILER_SENDGRID_WEBHOOK_PUBLIC_KEY``).
The signature (base64 DER) is in ``X-Twilio-Email-Event-Webhook-Signature``, the Unix
time it signed at in ``X-Twilio-Email-Event-Webhook-Timestamp``, and the signed bytes
are that timestamp's text followed by the body exactly as received, so the body is
verified before it is parsed. Headers missing: 401; a timestamp more than
``MAILER_WEBHOOK_MAX_AGE_S`` away from now (a replay) or a signature that does not
verify: 403; no key configured: 404.

The body is a JSON array of events. ``bounce`` → hard (``type`` ``blocked``: soft),
refined by ``status``/``reason`` (``common.refine``); ``dropped`` by its ``reason``:
"Bounced Address" and "Invalid" → hard, "Spam Reporting Address" → complaint, the rest
ignored; ``spamreport`` → complaint. Deliveries, deferrals (SendGrid reports a deferral
that ends in failure again, as a bounce), opens, clicks and its own unsubscribes are
skipped; any other event is stored as ignored. ``smtp-id`` carries our Message-ID.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from mailer.bounces.providers import common
from mailer.bounces.providers.common import Received, Rejected, Reported, text
from mailer.config import Settings
from mailer.config_values import ec_public_key
from mailer.models import BounceKind

PROVIDER = "sendgrid"
MAX_BYTES = 1024 * 1024  # SendGrid posts a batch when it reaches 768 KB
MAX_EVENTS = 5000
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
SKIPPED = {
    "processed", "delivered", "deferred", "open", "click",
    "unsubscribe", "group_unsubscribe", "group_resubscribe",
}  # fmt: skip
DROPPED = {
    "bounced address": BounceKind.hard,
    "invalid": BounceKind.hard,
    "spam reporting address": BounceKind.complaint,
}


@functools.lru_cache(maxsize=4)
def _key(text_key: str) -> ec.EllipticCurvePublicKey:
    return ec_public_key(text_key)


def verify(
    settings: Settings, signature: str | None, timestamp: str | None, body: bytes, now: float
) -> None:
    """Return when ``body`` is signed by the configured key at a fresh ``timestamp``."""
    if not settings.sendgrid_webhook_public_key:
        raise Rejected(
            404, "the SendGrid webhook is disabled: set MAILER_SENDGRID_WEBHOOK_PUBLIC_KEY"
        )
    if not signature or not timestamp:
        raise Rejected(401, f"unsigned: {SIGNATURE_HEADER} and {TIMESTAMP_HEADER} are required")
    signed_at = common.number(timestamp)
    if signed_at is None:
        raise Rejected(403, f"{TIMESTAMP_HEADER} is not a Unix time")
    if abs(now - signed_at) > settings.webhook_max_age_s:
        raise Rejected(
            403, f"timestamp more than {settings.webhook_max_age_s} s from now: refused as a replay"
        )
    try:
        raw = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(403, f"{SIGNATURE_HEADER} is not base64") from None
    key = _key(settings.sendgrid_webhook_public_key)
    try:
        key.verify(raw, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise Rejected(403, "signature does not verify") from None


def receive(body: bytes) -> Received:
    """Map a verified batch of SendGrid events."""
    doc = common.parse_json(body)
    if not isinstance(doc, list):
        raise Rejected(400, "expected a JSON array of SendGrid events")
    if len(doc) > MAX_EVENTS:
        raise Rejected(400, f"more than {MAX_EVENTS} events in one request")
    events: list[Reported] = []
    skipped = 0
    for item in doc:
        name = (text(item, "event", 40) or "").lower()
        if name in SKIPPED:
            skipped += 1
        else:
            events.append(_event(item if isinstance(item, Mapping) else {}, name))
    return Received(events, skipped=skipped)


def _event(item: Mapping[str, object], name: str) -> Reported:
    reason = text(item, "reason", 500)
    status = text(item, "status", 16) or common.enhanced(reason)
    code = common.smtp_code(reason)
    bounce_type = (text(item, "type", 40) or "bounce").lower()
    note = f"SendGrid {name or '(no event)'}"
    if name == "bounce":
        base = BounceKind.soft if bounce_type == "blocked" else BounceKind.hard
        kind = common.refine(base, status=status, code=code, diagnostic=reason)
        note += f" ({bounce_type})"
    elif name == "dropped":
        kind = DROPPED.get((reason or "").lower(), BounceKind.ignored)
        note += f": {reason or 'no reason'}"
    elif name == "spamreport":
        kind = BounceKind.complaint
    else:
        kind = BounceKind.ignored
    event_id = text(item, "sg_event_id", 200)
    try:
        whole = json.dumps(item, sort_keys=True, default=str)
    except (ValueError, RecursionError):  # nested about as deep as the parser allowed
        whole = repr(sorted(item))
    key = (name, event_id) if event_id else (name, whole)
    return common.reported(
        PROVIDER,
        kind,
        key=key,
        email=text(item, "email", 320),
        status=status,
        code=code,
        diagnostic=reason,
        note=note,
        raw_size=len(whole),
        message_id=common.message_id(text(item, "smtp-id", 400)),
    )
