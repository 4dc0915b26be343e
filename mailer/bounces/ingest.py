"""The one way in: every source of bounces and complaints ends in this module.

- :func:`ingest` takes one raw message (``mailer bounces ingest`` from a pipe,
  ``mailer bounces serve`` over SMTP): parse, identify from signed evidence,
  classify, store once, act, and answer with one line for people.
- :func:`apply_event` takes an event that is already parsed and identified
  (provider webhooks, after checking the provider's signature).
- :func:`apply_events` is the same inside a caller's transaction: the delivery
  recorder uses it for refusals during the SMTP transaction.

A database that cannot be reached raises :class:`IngestUnavailable`, so a pipe
exits with "try again later" (EX_TEMPFAIL) and an SMTP listener answers 451: the
relay keeps the report and retries instead of it being lost (docs/bounces.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from mailer.bounces import rules
from mailer.bounces.classify import effective_status, kind_for, kind_for_feedback
from mailer.bounces.events import BounceEvent, report_fingerprint
from mailer.bounces.identify import Identity, identify
from mailer.bounces.parse import MAX_BYTES, RecipientStatus, Report, ReportType, parse
from mailer.config import Settings
from mailer.db import utcnow
from mailer.models import BounceKind, Subscriber
from mailer.runtime import Runtime

# What a database that is down or unreachable raises (not: what a bug raises).
_UNAVAILABLE = (OperationalError, InterfaceError, OSError, TimeoutError)
ACTS_ON_SUBSCRIBER = (BounceKind.hard, BounceKind.soft, BounceKind.complaint, BounceKind.policy)


class IngestUnavailable(Exception):
    """The database could not be reached: the report was not stored; try again later."""


@dataclass(frozen=True)
class IngestResult:
    summary: str  # one line for people: what the report was and what it changed
    kind: BounceKind | None = None  # None: unreadable, nothing stored
    event_id: int | None = None
    subscriber_id: int | None = None
    blast_id: int | None = None
    duplicate: bool = False
    paused: str | None = None

    @property
    def readable(self) -> bool:
        """False only for input that is not an email message at all."""
        return self.kind is not None


def read_capped(stream: BinaryIO, cap: int = MAX_BYTES) -> tuple[bytes, int]:
    """At most ``cap`` bytes of ``stream`` and its full size. The rest is read and dropped,
    not left unread: an MTA piping a 20 MB DSN must see it all consumed."""
    kept = stream.read(cap)
    size = len(kept)
    while chunk := stream.read(1 << 20):
        size += len(chunk)
    return kept, size


def _pick(recipients: list[RecipientStatus]) -> RecipientStatus:
    """The recipient block to act on. With VERP a report concerns one subscriber, so a
    report with several blocks is unusual; a failure outranks a delay, a delay a notice."""
    for action in ("failed", "delayed"):
        for r in recipients:
            if (r.action or "").lower() == action:
                return r
    return recipients[0] if recipients else RecipientStatus()


def classify_report(report: Report, source: str, envelope_to: str | None) -> BounceEvent:
    """The event a report would be, before anyone is identified."""
    chosen = _pick(report.recipients)
    kind: BounceKind
    if report.type is ReportType.arf:
        kind = kind_for_feedback(report.feedback_type)
    elif report.type in (ReportType.dsn, ReportType.text):
        found = kind_for(
            status=chosen.status,
            code=chosen.code,
            diagnostic=chosen.diagnostic,
            action=chosen.action,
        )
        kind = found or BounceKind.soft  # a bounce that says nothing: counted, never hard
    else:
        kind = BounceKind.ignored
    notes = list(report.notes)
    if report.type is ReportType.other:
        notes.insert(0, report.why)
    elif report.type is ReportType.arf:
        notes.insert(0, f"feedback type {report.feedback_type}")
    return BounceEvent(
        kind=kind,
        source=source,
        fingerprint=report_fingerprint(report.digest, envelope_to or report.delivered_to),
        report=report.type.value,
        status=effective_status(chosen.status, chosen.diagnostic),
        code=chosen.code,
        diagnostic=chosen.diagnostic,
        note="; ".join(notes)[:300] or None,
        raw_size=report.raw_size,
    )


def _identified(event: BounceEvent, who: Identity) -> BounceEvent:
    event = replace(
        event, subscriber_id=who.subscriber_id, blast_id=who.blast_id, evidence=who.evidence
    )
    if who.problem and event.kind in ACTS_ON_SUBSCRIBER:
        if who.evidence is None:  # nobody proven: stored as unmatched, changes nothing
            event = replace(event, kind=BounceKind.unmatched).with_note(f"would be {event.kind}")
        event = event.with_note(who.problem)
    return event


async def ingest(
    runtime: Runtime,
    raw: bytes,
    *,
    source: str,
    envelope_to: str | None = None,
    now: datetime | None = None,
    raw_size: int | None = None,
) -> IngestResult:
    """Ingest one raw RFC 5322 message. Never raises for what the message contains;
    raises :class:`IngestUnavailable` when the database cannot be reached."""
    report = parse(raw[:MAX_BYTES], raw_size=raw_size if raw_size is not None else len(raw))
    if not report.readable:
        return IngestResult(f"unreadable: {report.why}; nothing stored")
    event = classify_report(report, source, envelope_to)
    try:
        async with runtime.sessions() as session:
            who = await identify(session, runtime.settings, runtime.tokens, report, envelope_to)
            event = _identified(event, who)
            applied = await rules.apply(session, runtime.settings, event, now or utcnow())
            await session.commit()
    except _UNAVAILABLE as exc:
        raise IngestUnavailable(f"database unavailable: {type(exc).__name__}") from exc
    return _result(event, applied)


async def apply_event(
    runtime: Runtime, event: BounceEvent, *, now: datetime | None = None
) -> IngestResult:
    """Store and act on an already identified event (e.g. a provider webhook), and commit."""
    try:
        async with runtime.sessions() as session:
            event = await _resolve_provider_address(session, event)
            applied = await rules.apply(session, runtime.settings, event, now or utcnow())
            await session.commit()
    except _UNAVAILABLE as exc:
        raise IngestUnavailable(f"database unavailable: {type(exc).__name__}") from exc
    return _result(event, applied)


async def apply_events(
    session: AsyncSession, settings: Settings, events: list[BounceEvent], now: datetime
) -> list[rules.Applied]:
    """Store and act on events inside the caller's transaction; the caller commits."""
    return [await rules.apply(session, settings, event, now) for event in events]


async def _resolve_provider_address(session: AsyncSession, event: BounceEvent) -> BounceEvent:
    """A provider-verified recipient address names the subscriber; nothing else may."""
    if event.subscriber_id is None and event.email and event.evidence == "provider":
        if event.source.startswith("webhook:"):
            email = event.email.strip().lower()
            found = await session.scalar(select(Subscriber.id).where(Subscriber.email == email))
            if found is not None:
                return replace(event, subscriber_id=int(found))
    if event.subscriber_id is None and event.blast_id is None and event.kind in ACTS_ON_SUBSCRIBER:
        return replace(event, kind=BounceKind.unmatched).with_note(
            f"would be {event.kind}; no signed evidence or verified provider address of who"
        )
    return event


def _result(event: BounceEvent, applied: rules.Applied) -> IngestResult:
    what = {
        "dsn": "DSN",
        "arf": "complaint report",
        "text": "bounce (prose)",
        "other": "message",
    }.get(event.report, event.report)
    if applied.duplicate:
        return IngestResult(
            f"duplicate {what}: already ingested; nothing changed",
            kind=event.kind,
            duplicate=True,
            subscriber_id=event.subscriber_id,
            blast_id=event.blast_id,
        )
    code = " ".join(str(x) for x in (event.code, event.status) if x)
    who = ""
    if event.subscriber_id is not None:
        who = f" for subscriber {event.subscriber_id}"
        who += f" in blast {event.blast_id}" if event.blast_id is not None else ""
        who += f" (by {event.evidence})"
    head = f"{event.kind} {what}{f' {code}' if code else ''}{who}"
    summary = f"{head}: {applied.action}"
    if applied.paused:
        summary += f"; blast {event.blast_id} {applied.paused}"
    if event.note:
        summary += f" [{event.note}]"
    return IngestResult(
        summary=" ".join(summary.split())[:1000],
        kind=event.kind,
        event_id=applied.event_id,
        subscriber_id=event.subscriber_id,
        blast_id=event.blast_id,
        paused=applied.paused,
    )
