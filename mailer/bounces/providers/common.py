"""What every provider webhook shares: refusals, mapped events, fingerprints, delivery.

A provider module turns a verified payload into :class:`Reported` events, each a
:class:`~mailer.bounces.events.BounceEvent` plus the original message's headers
when the payload carries them. :func:`deliver` then finds who each one is about:

- the HMAC ``Message-ID`` or the signed ``List-Unsubscribe`` token, when present and
  valid for the provider's recipient address, names subscriber *and* blast;
- otherwise the recipient address alone, marked ``evidence="provider"``: the provider's
  signature proves where the mail went (docs/bounces.md), so ``apply_event`` may look
  the subscriber up by it. Nothing here trusts an address that no signature covers.

Payloads are hostile until verified and odd after that, so every field is read with
its type checked (:func:`text`, :func:`obj`, :func:`items`), never indexed blindly.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from sqlalchemy.exc import InterfaceError, OperationalError

from mailer.bounces.classify import kind_for
from mailer.bounces.events import BounceEvent
from mailer.bounces.identify import from_headers
from mailer.bounces.ingest import (
    ACTS_ON_SUBSCRIBER,
    IngestResult,
    IngestUnavailable,
    apply_event,
)
from mailer.models import BounceKind
from mailer.runtime import Runtime

_SMTP_CODE = re.compile(r"^\s*(?:smtp\s*;\s*)?([245]\d\d)(?![\d.])", re.I)
_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
_MESSAGE_ID = re.compile(r"<[^<>\s]{1,300}>")
_DIGITS = re.compile(r"[0-9]+")
# What a database that is down raises (as ingest.py reads it), not what a bug raises.
_UNAVAILABLE = (OperationalError, InterfaceError, OSError, TimeoutError)


class Rejected(Exception):
    """The request is refused before anything is written: ``status`` and a clear ``detail``."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


@dataclass(frozen=True)
class Reported:
    """One provider event, mapped, before anyone is identified."""

    event: BounceEvent
    message_id: str | None = None
    list_unsubscribe: str | None = None


@dataclass(frozen=True)
class Received:
    """What one verified request carried: the events to act on, and how many were skipped
    because they are not bounces at all (deliveries, opens, clicks)."""

    events: list[Reported]
    skipped: int = 0
    note: str | None = None


def parse_json(body: bytes) -> object:
    """The JSON document in ``body``; 400 naming the problem when it is not one."""
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise Rejected(
            400, f"body is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
        ) from None
    except (ValueError, RecursionError):  # not UTF-8, nested too deep, a 5000-digit number
        raise Rejected(
            400, "body is not valid JSON (it must be UTF-8, not nested too deep)"
        ) from None


def text(data: object, key: str, limit: int = 1000) -> str | None:
    """``data[key]`` when it is a non-empty string (numbers as text), cut to ``limit``."""
    if not isinstance(data, Mapping):
        return None
    value = data.get(key)
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()[:limit]


def obj(data: object, key: str) -> Mapping[str, object]:
    value = data.get(key) if isinstance(data, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def items(data: object, key: str | None = None, limit: int = 1000) -> list[object]:
    value = data.get(key) if key is not None and isinstance(data, Mapping) else data
    return list(value[:limit]) if isinstance(value, list) else []


def number(value: str | None, digits: int = 12) -> int | None:
    """``value`` as a non-negative integer when it is plain ASCII digits, else None.
    (``str.isdigit`` accepts "²" and "١٢٣", which ``int`` then refuses.)"""
    if value is None or not _DIGITS.fullmatch(value) or len(value) > digits:
        return None
    return int(value)


def smtp_code(diagnostic: str | None) -> int | None:
    """The SMTP reply code a diagnostic starts with (``smtp; 550 5.1.1 …`` → 550)."""
    match = _SMTP_CODE.match(diagnostic or "")
    return int(match.group(1)) if match else None


def enhanced(*texts: str | None) -> str | None:
    """The first enhanced status code (``5.1.1``) found in ``texts``."""
    for value in texts:
        match = _ENHANCED.search(value or "")
        if match:
            return match.group(1)
    return None


def message_id(value: str | None) -> str | None:
    """A Message-ID in its ``<…>`` form (Mailgun and some payloads drop the brackets)."""
    if not value:
        return None
    value = value.strip()
    found = _MESSAGE_ID.search(value) or _MESSAGE_ID.fullmatch(f"<{value}>")
    return found.group(0) if found else None


def refine(
    kind: BounceKind, *, status: str | None, code: int | None, diagnostic: str | None
) -> BounceKind:
    """A provider's hard or soft verdict, made milder (never harsher) by the codes it reports.

    The rules of ``classify.kind_for`` apply, as for a DSN: a 5.7.x policy refusal is the
    sender's problem and never held against the subscriber, and "mailbox full" is soft
    even when a provider calls the bounce permanent."""
    if kind not in (BounceKind.hard, BounceKind.soft):
        return kind
    # Only a real enhanced code reaches kind_for, which takes Status fields as parsed.
    reply = code if code is not None and 200 <= code < 600 else None
    said = kind_for(status=enhanced(status), code=reply, diagnostic=diagnostic)
    if said is BounceKind.policy:
        return BounceKind.policy
    if kind is BounceKind.hard and said is BounceKind.soft:
        return BounceKind.soft
    return kind


def fingerprint(provider: str, *parts: str) -> str:
    """``webhook:PROVIDER:`` + a hash of the provider's own ids for the event, so a retried
    webhook (or a replayed one) is stored and counted once."""
    digest = hashlib.sha256("\0".join(parts).encode("utf-8", "replace")).hexdigest()
    return f"webhook:{provider}:{digest[:64]}"


def reported(
    provider: str,
    kind: BounceKind,
    *,
    key: tuple[str, ...],
    email: str | None,
    status: str | None = None,
    code: int | None = None,
    diagnostic: str | None = None,
    note: str | None = None,
    message_id: str | None = None,
    list_unsubscribe: str | None = None,
    raw_size: int = 0,
) -> Reported:
    """A :class:`Reported` event for ``provider``, every field cut to what the table holds."""
    address = email.strip().strip("<>").lower() if email else None
    if address is not None and ("@" not in address or len(address) > 254):
        address = None
    if code is not None and not 200 <= code < 600:
        code = None
    event = BounceEvent(
        kind=kind,
        source=f"webhook:{provider}",
        fingerprint=fingerprint(provider, *key),
        report="webhook",
        evidence="provider" if address else None,
        email=address,
        status=enhanced(status),
        code=code,
        diagnostic=diagnostic[:500] if diagnostic else None,
        note=note[:300] if note else None,
        raw_size=raw_size,
    )
    return Reported(event, message_id=message_id, list_unsubscribe=list_unsubscribe)


async def identify(runtime: Runtime, item: Reported) -> BounceEvent:
    """The event, with subscriber and blast when the original headers prove them."""
    event = item.event
    if event.kind in ACTS_ON_SUBSCRIBER and not event.email:
        return replace(event, kind=BounceKind.unmatched).with_note(
            f"would be {event.kind}; the payload names no recipient address"
        )
    if not (item.message_id or item.list_unsubscribe):
        return event
    try:
        async with runtime.reads() as session:
            who = await from_headers(
                session,
                runtime.settings,
                runtime.tokens,
                message_id=item.message_id,
                list_unsubscribe=item.list_unsubscribe,
                addresses=[event.email] if event.email else [],
            )
    except _UNAVAILABLE as exc:
        raise IngestUnavailable(f"database unavailable: {type(exc).__name__}") from exc
    if who.subscriber_id is None:
        return event  # the provider's address still names them (evidence "provider")
    return replace(
        event, subscriber_id=who.subscriber_id, blast_id=who.blast_id, evidence=who.evidence
    )


async def deliver(runtime: Runtime, events: list[Reported]) -> list[IngestResult]:
    """Identify, store once and act on each event, in order; each commits on its own, so a
    provider retrying after a failure part-way finds the first ones already stored."""
    return [await apply_event(runtime, await identify(runtime, item)) for item in events]
