"""Mailgun webhooks: HMAC-SHA256 of timestamp + token with the webhook signing key.

Mailgun puts the signature in the JSON body: ``signature: {timestamp, token, signature}``
where ``signature`` is the hex HMAC-SHA256, keyed with ``MAILER_MAILGUN_SIGNING_KEY``,
of the timestamp's text followed by the token. Events of a subaccount carry a
``parent-signature`` made with the primary account's key; either one verifying is
enough. Compared in constant time. The signature covers only timestamp and token, not
the event, so freshness and one-time use are what stop a replay or a signature lifted
onto another body: a timestamp more than ``MAILER_WEBHOOK_MAX_AGE_S`` from now is
refused (403), and each token is remembered in Redis (``keys.webhook_token``) for twice
that long, a second use refused (403). No signature: 401; not configured: 404.

``event-data.event`` ``failed``: ``severity`` permanent → hard, temporary → soft, refined
by ``delivery-status`` (``common.refine``); the ``reason`` ``suppress-complaint`` (the
address complained before) → complaint, ``suppress-unsubscribe`` → ignored.
``complained`` → complaint. Accepted, delivered, opened, clicked, unsubscribed, stored
and rejected are skipped; anything else is stored as ignored.
``message.headers.message-id`` is our Message-ID, which Mailgun writes without brackets.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping

from pydantic import SecretStr
from redis.asyncio import Redis

from mailer.bounces.providers import common
from mailer.bounces.providers.common import Received, Rejected, Reported, text
from mailer.config import Settings
from mailer.keys import Keys
from mailer.models import BounceKind

PROVIDER = "mailgun"
MAX_BYTES = 64 * 1024  # one event, its headers only
SKIPPED = {"accepted", "delivered", "opened", "clicked", "unsubscribed", "stored", "rejected"}
SEVERITY = {"permanent": BounceKind.hard, "temporary": BounceKind.soft}
REASONS = {
    "suppress-complaint": BounceKind.complaint,
    "suppress-unsubscribe": BounceKind.ignored,
}
_TOKEN = re.compile(r"[A-Za-z0-9]{10,200}")


def configured(settings: Settings) -> SecretStr:
    """The signing key; 404 while there is none."""
    if settings.mailgun_signing_key is None:
        raise Rejected(404, "the Mailgun webhook is disabled: set MAILER_MAILGUN_SIGNING_KEY")
    return settings.mailgun_signing_key


def verify(settings: Settings, doc: object, now: float) -> str:
    """The request's one-time token, once its signature verifies and it is fresh."""
    signing_key = configured(settings)
    if not isinstance(doc, dict):
        raise Rejected(400, "expected a JSON object with signature and event-data")
    signed = common.obj(doc, "signature")
    timestamp, token = text(signed, "timestamp", 20), text(signed, "token", 300)
    given = [text(signed, "signature", 200), text(signed, "parent-signature", 200)]
    if not timestamp or not token or not any(given):
        raise Rejected(401, "unsigned: signature.timestamp, .token and .signature are required")
    signed_at = common.number(timestamp)
    if signed_at is None or not _TOKEN.fullmatch(token):
        raise Rejected(403, "signature.timestamp or signature.token is malformed")
    key = signing_key.get_secret_value().encode()
    expected = hmac.new(key, (timestamp + token).encode(), hashlib.sha256).hexdigest()
    matches = [hmac.compare_digest(expected, (g or "").strip().lower()) for g in given]
    if not any(matches):
        raise Rejected(403, "signature does not verify")
    if abs(now - signed_at) > settings.webhook_max_age_s:
        raise Rejected(
            403, f"timestamp more than {settings.webhook_max_age_s} s from now: refused as a replay"
        )
    return token


async def claim(redis: Redis, keys: Keys, settings: Settings, token: str) -> None:
    """Mark ``token`` used; 403 when it already was (a replayed request)."""
    ttl = 2 * settings.webhook_max_age_s  # after that its timestamp is refused anyway
    if not await redis.set(keys.webhook_token(PROVIDER, token), b"1", nx=True, ex=ttl):
        raise Rejected(403, "this signature token was already used: refused as a replay")


async def release(redis: Redis, keys: Keys, token: str) -> None:
    """Forget ``token`` after a failure of ours, so Mailgun's retry is not taken for a replay."""
    await redis.delete(keys.webhook_token(PROVIDER, token))


def receive(doc: Mapping[str, object], size: int, token: str) -> Received:
    """Map the verified ``event-data`` of one Mailgun webhook."""
    data = common.obj(doc, "event-data")
    name = (text(data, "event", 40) or "").lower()
    if name in SKIPPED:
        return Received([], skipped=1)
    return Received([_event(data, name, size, token)])


def _event(data: Mapping[str, object], name: str, size: int, token: str) -> Reported:
    status_block = common.obj(data, "delivery-status")
    diagnostic = text(status_block, "message", 500) or text(status_block, "description", 500)
    status = text(status_block, "enhanced-code", 16) or common.enhanced(
        diagnostic, text(status_block, "description", 500)
    )
    code = common.number(text(status_block, "code", 6), 3) or common.smtp_code(diagnostic)
    severity = (text(data, "severity", 20) or "").lower()
    reason = (text(data, "reason", 60) or "").lower()
    note = f"Mailgun {name or '(no event)'}"
    if name == "failed":
        base = REASONS.get(reason) or SEVERITY.get(severity, BounceKind.soft)
        kind = common.refine(base, status=status, code=code, diagnostic=diagnostic)
        note += f" ({severity or 'no severity'}, {reason or 'no reason'})"
    elif name == "complained":
        kind = BounceKind.complaint
    else:
        kind = BounceKind.ignored
    headers = common.obj(common.obj(data, "message"), "headers")
    event_id = text(data, "id", 200)
    # Mailgun's event id is unique within a day; with the event's own timestamp it is unique.
    key = (name, event_id, text(data, "timestamp", 40) or "") if event_id else (name, token)
    return common.reported(
        PROVIDER,
        kind,
        key=key,
        email=text(data, "recipient", 320),
        status=status,
        code=code,
        diagnostic=diagnostic,
        note=note,
        raw_size=size,
        message_id=common.message_id(text(headers, "message-id", 400)),
    )
