"""Bounces and complaints: parse DSN/ARF/prose → identify (signed evidence only) →
classify → store once → act. One module per stage; docs/bounces.md has the design.

Public API (what other modules and the webhooks call):

- ``ingest(runtime, raw, *, source, envelope_to=None, now=None, raw_size=None)``
- ``apply_event(runtime, event, *, now=None)`` for already identified events
- ``apply_events(session, settings, events, now)`` inside a caller's transaction
- ``BounceEvent``, ``BounceKind``, ``send_event(...)``, ``report_fingerprint(...)``
- ``identify.from_headers(...)`` to identify from a provider payload's headers
- ``classify.kind_for(...)``, ``classify.kind_for_feedback(...)``
- ``stats.for_blast(session, blast_id)``, ``stats.totals(session)``, ``stats.log(...)``
"""

from mailer.bounces.events import BounceEvent, BounceKind, report_fingerprint, send_event
from mailer.bounces.ingest import (
    IngestResult,
    IngestUnavailable,
    apply_event,
    apply_events,
    ingest,
    read_capped,
)

__all__ = [
    "BounceEvent",
    "BounceKind",
    "IngestResult",
    "IngestUnavailable",
    "apply_event",
    "apply_events",
    "ingest",
    "read_capped",
    "report_fingerprint",
    "send_event",
]
