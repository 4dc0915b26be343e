"""Amazon SES bounce and complaint notifications, delivered by SNS.

SES publishes to an SNS topic; SNS POSTs each message, signed, to
``/webhooks/ses``. Checked in this order, each failure refused with nothing written:
the topic is one of ``MAILER_SES_TOPIC_ARNS`` (403; 404 when none is configured), the
signature verifies (``sns.py``: 401/403). Then by ``Type``:

- ``SubscriptionConfirmation``: confirmed by visiting its ``SubscribeURL``;
- ``UnsubscribeConfirmation``: noted, nothing else (no re-subscribing behind ops' back);
- ``Notification``: the ``Message`` is SES's JSON. ``notificationType`` (``eventType``
  for configuration-set event publishing) ``Bounce``: one event per bounced recipient,
  ``bounceType`` Permanent → hard, Transient and Undetermined → soft, refined by the
  recipient's ``status``/``diagnosticCode`` (``common.refine``); ``Complaint``: one
  complaint per complained recipient (``complaintFeedbackType`` ``not-spam`` is ignored).
  Deliveries, opens, clicks and delays are skipped: SES reports a delay that ends in
  failure again as a bounce. Anything else is stored as ignored.

The original ``Message-ID`` (``mail.commonHeaders.messageId``, else ``mail.headers``)
and ``List-Unsubscribe`` identify subscriber and blast when they verify; otherwise the
recipient address does (SNS's signature proves it). Raw message delivery must stay
off on the subscription: its bodies carry no signature and are refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from mailer.bounces.classify import kind_for_feedback
from mailer.bounces.providers import common
from mailer.bounces.providers.common import Received, Rejected, Reported, text
from mailer.bounces.providers.sns import TYPES, SnsVerifier
from mailer.config import Settings
from mailer.models import BounceKind

PROVIDER = "ses"
MAX_BYTES = 512 * 1024  # an SNS message is at most 256 KiB, escaped once more in the envelope
SKIPPED = {"delivery", "send", "open", "click", "deliverydelay", "reject", "renderingfailure"}
BOUNCE_TYPES = {
    "permanent": BounceKind.hard,
    "transient": BounceKind.soft,
    "undetermined": BounceKind.soft,
}


async def receive(
    settings: Settings, verifier: SnsVerifier, body: bytes, message_type: str | None
) -> Received:
    """Verify one SNS POST and map what it carries."""
    if not settings.ses_topic_arns:
        raise Rejected(404, "the SES webhook is disabled: set MAILER_SES_TOPIC_ARNS")
    message = common.parse_json(body)
    if not isinstance(message, dict) or message.get("Type") not in TYPES:
        raise Rejected(
            400, "not an SNS message: expected a JSON object with Type " + "/".join(TYPES)
        )
    if message_type is not None and message_type != message["Type"]:
        raise Rejected(400, "x-amz-sns-message-type does not match the message's Type")
    topic = message.get("TopicArn")
    if topic not in settings.ses_topic_arns:
        raise Rejected(403, "TopicArn is not one of MAILER_SES_TOPIC_ARNS")
    await verifier.verify(message)
    if message["Type"] == "SubscriptionConfirmation":
        await verifier.confirm(message.get("SubscribeURL"))
        return Received([], note=f"subscription to {topic} confirmed")
    if message["Type"] == "UnsubscribeConfirmation":
        return Received([], note=f"unsubscribed from {topic}; not re-subscribed")
    return notification(message, len(body))


def notification(envelope: Mapping[str, object], size: int) -> Received:
    """The events in a verified SNS ``Notification`` from SES."""
    sns_id = text(envelope, "MessageId", 200) or ""
    try:
        ses = json.loads(str(envelope.get("Message")))
    except (ValueError, RecursionError):
        ses = None
    if not isinstance(ses, dict):
        return Received([_ignored(sns_id, "not an SES notification (Message is not JSON)", size)])
    kind = text(ses, "notificationType", 40) or text(ses, "eventType", 40) or ""
    mail = common.obj(ses, "mail")
    headers = _headers(mail)
    found_id = common.message_id(
        text(common.obj(mail, "commonHeaders"), "messageId") or headers.get("message-id")
    )
    original = Original(found_id, headers.get("list-unsubscribe"))
    if kind == "Bounce":
        return Received(_bounces(common.obj(ses, "bounce"), sns_id, size, original))
    if kind == "Complaint":
        return Received(_complaints(common.obj(ses, "complaint"), sns_id, size, original))
    if kind.replace(" ", "").lower() in SKIPPED:
        return Received([], skipped=1)
    return Received([_ignored(sns_id, f"SES notification type {kind[:40] or '(none)'!r}", size)])


@dataclass(frozen=True)
class Original:
    """What the notification says of the message that bounced: its signed headers."""

    message_id: str | None
    list_unsubscribe: str | None


def _headers(mail: Mapping[str, object]) -> dict[str, str]:
    """``mail.headers`` (a list of name/value pairs) as a dict of lower-case names."""
    out: dict[str, str] = {}
    for header in common.items(mail, "headers", 200):
        name, value = text(header, "name", 100), text(header, "value", 2000)
        if name and value:
            out.setdefault(name.lower(), value)
    return out


def _bounces(
    bounce: Mapping[str, object], sns_id: str, size: int, original: Original
) -> list[Reported]:
    bounce_type = text(bounce, "bounceType", 40) or ""
    sub_type = text(bounce, "bounceSubType", 60) or ""
    base = BOUNCE_TYPES.get(bounce_type.lower())
    feedback = text(bounce, "feedbackId", 200) or sns_id
    out = []
    for recipient in common.items(bounce, "bouncedRecipients", 100):
        email = text(recipient, "emailAddress", 320)
        diagnostic = text(recipient, "diagnosticCode", 500)
        status = text(recipient, "status", 16) or common.enhanced(diagnostic)
        code = common.smtp_code(diagnostic)
        kind = BounceKind.ignored if base is None else base
        kind = common.refine(kind, status=status, code=code, diagnostic=diagnostic)
        note = f"SES {bounce_type or 'bounce'}/{sub_type or '-'}"
        if base is None:
            note += ": unknown bounceType, ignored"
        out.append(
            common.reported(
                PROVIDER,
                kind,
                key=("bounce", feedback, (email or "").lower()),
                email=email,
                status=status,
                code=code,
                diagnostic=diagnostic,
                note=note,
                raw_size=size,
                message_id=original.message_id,
                list_unsubscribe=original.list_unsubscribe,
            )
        )
    return out or [_ignored(sns_id, "SES bounce without bouncedRecipients", size)]


def _complaints(
    complaint: Mapping[str, object], sns_id: str, size: int, original: Original
) -> list[Reported]:
    feedback_type = text(complaint, "complaintFeedbackType", 40)
    kind = kind_for_feedback(feedback_type)
    feedback = text(complaint, "feedbackId", 200) or sns_id
    out = []
    for recipient in common.items(complaint, "complainedRecipients", 100):
        email = text(recipient, "emailAddress", 320)
        out.append(
            common.reported(
                PROVIDER,
                kind,
                key=("complaint", feedback, (email or "").lower()),
                email=email,
                note=f"SES complaint ({feedback_type or 'no feedback type'})",
                raw_size=size,
                message_id=original.message_id,
                list_unsubscribe=original.list_unsubscribe,
            )
        )
    return out or [_ignored(sns_id, "SES complaint without complainedRecipients", size)]


def _ignored(sns_id: str, why: str, size: int) -> Reported:
    return common.reported(
        PROVIDER, BounceKind.ignored, key=("sns", sns_id), email=None, note=why, raw_size=size
    )
