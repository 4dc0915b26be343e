"""The bounce event: what every source hands to the pipeline, and how it is stored once.

A DSN read from a pipe, a message received by ``mailer bounces serve``, a
provider's webhook and a refusal during the SMTP transaction all become one
:class:`BounceEvent`. Each carries a ``fingerprint``; the ``bounce_events``
table keeps it unique, so the same report ingested twice (a relay delivering
twice, a provider retrying its webhook, a recorder buffer repeated after a
crash) is stored and acted on once. Fingerprints by source:

- reports (cli, smtp): ``report:`` + a hash of the report's own Message-ID and
  body, the envelope recipient, see :func:`report_fingerprint`;
- SMTP-time refusals: ``send:BLAST:SUBSCRIBER`` (one final outcome per delivery);
- webhooks: ``webhook:PROVIDER:`` + the provider's event id.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from mailer.bounces.classify import kind_for
from mailer.models import BounceKind, StoredBounce

_ENHANCED = re.compile(r"\b[245]\.\d{1,3}\.\d{1,3}\b")

__all__ = ["BounceEvent", "BounceKind", "report_fingerprint", "send_event", "store"]


@dataclass(frozen=True)
class BounceEvent:
    """One bounce, complaint or ignored report, ready to store and act on.

    ``subscriber_id`` and ``blast_id`` must come from signed evidence (see
    ``identify.py``) or from a provider whose signature was verified; ``evidence`` says
    which. A webhook that only has the recipient's address sets ``email`` together with
    ``evidence="provider"``; ``apply_event`` then looks the subscriber up by it. Nothing
    else may turn an address into a subscriber.
    """

    kind: BounceKind
    source: str  # cli, smtp, send, webhook:<provider>
    fingerprint: str
    report: str = "event"  # dsn, arf, text, other, smtp, webhook
    subscriber_id: int | None = None
    blast_id: int | None = None
    evidence: str | None = None
    email: str | None = None  # provider-verified recipient, only with evidence="provider"
    status: str | None = None  # enhanced status code, 5.1.1
    code: int | None = None  # SMTP reply code, 550
    diagnostic: str | None = None
    note: str | None = None
    raw_size: int = 0

    def with_note(self, note: str) -> BounceEvent:
        joined = f"{self.note}; {note}" if self.note else note
        return replace(self, note=joined[:300])


def report_fingerprint(digest: str, envelope_to: str | None) -> str:
    """The same report (same own Message-ID and body) to the same bounce address."""
    to = (envelope_to or "").strip().lower().encode()
    return "report:" + hashlib.sha256(digest.encode() + b"\0" + to).hexdigest()


def send_event(
    blast_id: int, subscriber_id: int, code: int | None, error: str | None
) -> BounceEvent:
    """A permanent refusal during the SMTP transaction (record.py), as an event.

    Classified by the same rules as a DSN, so ``550 5.1.1`` now and ``Status: 5.1.1``
    later are one kind of event. The delivery row already proves blast and subscriber."""
    kind = kind_for(code=code, diagnostic=error) or BounceKind.soft
    return BounceEvent(
        kind=kind,
        source="send",
        fingerprint=f"send:{blast_id}:{subscriber_id}",
        report="smtp",
        subscriber_id=subscriber_id,
        blast_id=blast_id,
        evidence="send",
        status=_enhanced(error),
        code=code,
        diagnostic=(error or "")[:500] or None,
    )


def _enhanced(text: str | None) -> str | None:
    match = _ENHANCED.search(text or "")
    return match.group(0) if match else None


async def store(session: AsyncSession, event: BounceEvent, now: datetime) -> int | None:
    """Insert the event; its row id, or None when its fingerprint is already stored.

    ``ON CONFLICT DO NOTHING`` rather than check-then-insert, so two processes ingesting
    the same report at once still store it once."""
    values = {
        "fingerprint": event.fingerprint[:100],
        "kind": event.kind.value,
        "report": event.report[:16],
        "source": event.source[:40],
        "blast_id": event.blast_id,
        "subscriber_id": event.subscriber_id,
        "evidence": event.evidence[:32] if event.evidence else None,
        "status": event.status[:16] if event.status else None,
        "code": event.code if event.code is None or 0 <= event.code < 1000 else None,
        "diagnostic": event.diagnostic[:500] if event.diagnostic else None,
        "note": event.note[:300] if event.note else None,
        "paused_blast": False,
        "raw_size": max(0, min(event.raw_size, 2**31 - 1)),
        "received_at": now,
    }
    # PostgreSQL and SQLite, the two supported databases, both have ON CONFLICT.
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = (
        insert(StoredBounce).values(values).on_conflict_do_nothing(index_elements=["fingerprint"])
    )
    row_id = await session.scalar(stmt.returning(StoredBounce.id))
    return int(row_id) if row_id is not None else None
