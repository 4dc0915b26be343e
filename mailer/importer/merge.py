"""The SQL side of an import: one chunk of rows merged into the table in one transaction.

A chunk costs a fixed handful of statements whatever its size (one SELECT of
the addresses already known, one of the suppression list, one bulk INSERT …
RETURNING, one bulk INSERT of events, bulk UPDATEs), which is what makes
100k-row files quick on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update

from mailer.db import readonly, utcnow
from mailer.importer.report import Chunk, Report
from mailer.importer.rows import ImportOptions, Row
from mailer.models import Subscriber, SubscriberEvent, SubscriberStatus
from mailer.privacy import suppressed_addresses
from mailer.runtime import Runtime
from mailer.subscriptions import LEFT


def _new_values(row: Row, now: datetime) -> dict[str, Any]:
    t = row.times
    values: dict[str, Any] = {
        "email": row.email,
        "name": row.name,
        "status": row.status,
        "created_at": t.get("created_at", now),
        "updated_at": now,
        "confirmed_at": t.get("confirmed_at"),
        "unsubscribed_at": t.get("unsubscribed_at"),
        "bounced_at": None,
        # Owed in the row itself, like subscriptions.subscribe does: a job lost in Redis
        # is queued again by the reconciler (mailer/confirmations.py).
        "confirm_due_at": now if row.status == SubscriberStatus.pending else None,
        "consent_at": t.get("consent_at"),
        "consent_ip": row.consent_ip,
        "consent_user_agent": None,
        "consent_source": row.consent_source,
    }
    if row.status == SubscriberStatus.confirmed:
        values["consent_at"] = t.get("consent_at", now)
        values["confirmed_at"] = t.get("confirmed_at", values["consent_at"])
    elif row.status == SubscriberStatus.unsubscribed:
        values["unsubscribed_at"] = t.get("unsubscribed_at", now)
    elif row.status == SubscriberStatus.bounced:
        values["bounced_at"] = now
    return values


def _detail(row: Row) -> str:
    if row.status == SubscriberStatus.confirmed:
        return f"as confirmed; consent source: {row.consent_source or 'consent_at in file'}"
    return f"as {row.status}"


def _event(subscriber_id: int, now: datetime, detail: str) -> dict[str, Any]:
    return {
        "subscriber_id": subscriber_id,
        "kind": "imported",
        "at": now,
        "ip": None,
        "user_agent": None,
        "detail": detail[:2000],
    }


async def apply_chunk(
    runtime: Runtime,
    chunk: Chunk,
    opts: ImportOptions,
    report: Report,
    now: datetime | None = None,
) -> list[int]:
    """Merge one chunk (counting into ``report``); return the ids to mail a confirmation to,
    each owed from ``now`` (``subscribers.confirm_due_at``).

    With ``opts.dry_run`` every decision is made and counted, but nothing is written.
    """
    emails = [r.email for r in chunk.rows] + [r.email for r in chunk.late_duplicates]
    if not emails:
        return []
    now = now or utcnow()
    # A dry run only reads: on SQLite it must not take (or wait for) the write lock.
    engine = readonly(runtime.engine) if opts.dry_run else runtime.engine
    async with engine.begin() as conn:
        found = await conn.execute(
            select(Subscriber.id, Subscriber.email, Subscriber.name, Subscriber.status).where(
                Subscriber.email.in_(emails)
            )
        )
        existing = {r.email: r for r in found}
        # New addresses, and pending ones a confirmed row would upgrade: an erased address
        # may come back only as pending, through its owner's own confirmation click.
        checked = [
            r.email
            for r in chunk.rows
            if r.email not in existing
            or (
                existing[r.email].status == SubscriberStatus.pending
                and r.status == SubscriberStatus.confirmed
            )
        ]
        suppressed = (
            await suppressed_addresses(conn, runtime.settings, checked) if checked else set()
        )

        inserts: list[dict[str, Any]] = []
        details: dict[str, str] = {}
        names: list[dict[str, Any]] = []
        upgrades: list[dict[str, Any]] = []
        for row in chunk.rows:
            old = existing.get(row.email)
            if old is None:
                if row.email in suppressed and not opts.allow_suppressed:
                    report.suppressed += 1
                    report.note(row.line, "suppressed (erased earlier)")
                    continue
                extra = ""
                if row.email in suppressed:
                    extra = "; was on the suppression list (--allow-suppressed)"
                    if row.status == SubscriberStatus.confirmed:
                        # They confirm it themselves; the list's consent claim does not count.
                        row.status = SubscriberStatus.pending
                        row.consent_source = row.consent_ip = None
                        row.times = {k: v for k, v in row.times.items() if k == "created_at"}
                        extra += ", so pending until they confirm"
                        report.note(row.line, "erased earlier: imported as pending, not confirmed")
                inserts.append(_new_values(row, now))
                details[row.email] = _detail(row) + extra
                report.imported += 1
                continue
            if old.status in LEFT:
                report.left += 1
                report.note(row.line, f"skipped: {old.status} earlier (left; not brought back)")
                continue
            if row.email in suppressed:  # pending again after an erasure: not upgraded
                report.left += 1
                report.note(row.line, "skipped: erased earlier (left; stays pending)")
                continue
            changed = False
            if old.name is None and row.name is not None:
                names.append({"sid": old.id, "new_name": row.name})
                changed = True
            if old.status == SubscriberStatus.pending and row.status == SubscriberStatus.confirmed:
                values = _new_values(row, now)
                upgrades.append(
                    {
                        "sid": old.id,
                        "c_at": values["consent_at"],
                        "c_confirmed": values["confirmed_at"],
                        "c_ip": values["consent_ip"],
                        "c_source": values["consent_source"],
                        "detail": _detail(row) + " (was pending)",
                    }
                )
                changed = True
            elif row.status in LEFT:
                report.note(row.line, f"kept {old.status}: an import does not end a subscription")
            if changed:
                report.updated += 1
            else:
                report.existing += 1
        for row in chunk.late_duplicates:  # already counted as duplicates
            old = existing.get(row.email)
            if old is not None and old.name is None and row.name and old.status not in LEFT:
                names.append({"sid": old.id, "new_name": row.name})

        if opts.dry_run:
            return []
        queued: list[int] = []
        events: list[dict[str, Any]] = []
        if inserts:
            returning = (Subscriber.id, Subscriber.email, Subscriber.status)
            result = await conn.execute(insert(Subscriber).returning(*returning), inserts)
            for sub_id, email, status in result:
                events.append(_event(sub_id, now, details[email]))
                if status == SubscriberStatus.pending:
                    queued.append(sub_id)
        if names:
            await conn.execute(
                update(Subscriber)
                .where(Subscriber.id == bindparam("sid"), Subscriber.name.is_(None))
                .values(name=bindparam("new_name"), updated_at=now),
                names,
            )
        if upgrades:
            await conn.execute(
                update(Subscriber)
                .where(Subscriber.id == bindparam("sid"))
                .where(Subscriber.status == SubscriberStatus.pending)
                .values(
                    status=SubscriberStatus.confirmed,
                    confirmed_at=bindparam("c_confirmed"),
                    consent_at=bindparam("c_at"),
                    consent_ip=func.coalesce(bindparam("c_ip"), Subscriber.consent_ip),
                    consent_source=bindparam("c_source"),
                    updated_at=now,
                ),
                [{k: v for k, v in u.items() if k != "detail"} for u in upgrades],
            )
            events += [_event(u["sid"], now, u["detail"]) for u in upgrades]
        if events:
            await conn.execute(insert(SubscriberEvent), events)
    return queued
