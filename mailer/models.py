"""Tables: SQL is the source of truth for subscribers, statements and every delivery.

Redis only ever holds work that can be re-derived from these rows.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from mailer.db import utcnow

# BIGINT primary keys do not autoincrement on SQLite; INTEGER does.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both SQLite (which drops the zone) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class SubscriberStatus(StrEnum):
    pending = "pending"
    confirmed = "confirmed"
    unsubscribed = "unsubscribed"
    bounced = "bounced"


class Subscriber(Base):
    __tablename__ = "subscribers"
    __table_args__ = (
        Index("ix_subscribers_status", "status"),
        Index("ix_subscribers_confirm_due_at", "confirm_due_at"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=SubscriberStatus.pending)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    unsubscribed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    bounced_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The confirmation mail is SQL truth like a blast (docs/security.md): due when one is
    # owed (NULL: none), sent when the relay last accepted one, attempts since it was owed.
    confirm_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    confirm_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    confirm_attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    # Someone posted this unsubscribed/bounced address to the sign-up form: the row keeps
    # its status until a confirmation link mailed after this is clicked (docs/security.md).
    resubscribe_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Consent record: who confirmed, from where, through what.
    consent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    consent_ip: Mapped[str | None] = mapped_column(String(64))
    consent_user_agent: Mapped[str | None] = mapped_column(String(512))
    consent_source: Mapped[str | None] = mapped_column(String(200))


class SubscriberEvent(Base):
    """Append-only history of a subscriber: the proof of consent and of every opt-out."""

    __tablename__ = "subscriber_events"
    __table_args__ = (Index("ix_subscriber_events_subscriber", "subscriber_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("subscribers.id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(512))
    detail: Mapped[str | None] = mapped_column(Text)


class Suppression(Base):
    """Salted hashes of erased addresses, so a later import cannot silently re-add them."""

    __tablename__ = "suppressions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    email_hash: Mapped[str] = mapped_column(String(64), unique=True)
    reason: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Editor(Base):
    __tablename__ = "editors"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    # Where notices for editors go ("new statement on the site"); optional.
    email: Mapped[str | None] = mapped_column(String(320))


class Statement(Base):
    __tablename__ = "statements"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    title: Mapped[str] = mapped_column(String(300))
    author: Mapped[str | None] = mapped_column(String(200))
    url: Mapped[str | None] = mapped_column(String(2000))
    body_markdown: Mapped[str] = mapped_column(Text)
    body_html: Mapped[str] = mapped_column(Text)
    body_text: Mapped[str] = mapped_column(Text)
    editor_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("editors.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # Where it came from: None when an editor wrote it, STATEMENT_FROM_SITE from a feed.
    source: Mapped[str | None] = mapped_column(String(16))


STATEMENT_FROM_SITE = "feed"


class BlastStatus(StrEnum):
    scheduled = "scheduled"
    queued = "queued"
    sending = "sending"
    paused = "paused"
    done = "done"
    cancelled = "cancelled"


class Blast(Base):
    __tablename__ = "blasts"
    __table_args__ = (Index("ix_blasts_status", "status"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    statement_id: Mapped[int] = mapped_column(BigId, ForeignKey("statements.id"))
    editor_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("editors.id"))
    status: Mapped[str] = mapped_column(String(16), default=BlastStatus.queued)
    send_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    total: Mapped[int] = mapped_column(Integer, default=0)
    # Why the blast is paused or waiting (policy rejections, daily quota), for people.
    reason: Mapped[str | None] = mapped_column(String(500))
    policy_failures: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DeliveryStatus(StrEnum):
    pending = "pending"
    sending = "sending"  # claimed by a worker under a lease
    sent = "sent"
    failed = "failed"
    skipped = "skipped"  # unsubscribed or bounced after the snapshot
    cancelled = "cancelled"


class Delivery(Base):
    """One row per blast and recipient: the snapshot, the claim and the outcome."""

    __tablename__ = "deliveries"
    # No foreign keys on this table, on purpose: checking two of them per row took 7.8 of
    # the 11.5 s that a 1M-recipient snapshot cost on PostgreSQL (docs/benchmarks.md, P5).
    # The code keeps the integrity they gave: blasts are never deleted, and erasing a
    # subscriber sets subscriber_id to NULL itself (mailer/privacy.py), using the index.
    __table_args__ = (
        UniqueConstraint("blast_id", "subscriber_id", name="uq_deliveries_blast_subscriber"),
        Index("ix_deliveries_blast_status", "blast_id", "status", "id"),
        Index("ix_deliveries_subscriber", "subscriber_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    blast_id: Mapped[int] = mapped_column(BigId)
    # NULL once the subscriber was erased: the row stays, anonymised, for the counts.
    subscriber_id: Mapped[int | None] = mapped_column(BigId)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.pending)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    first_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))


class BounceKind(StrEnum):
    hard = "hard"  # the address is dead: the subscriber becomes bounced at once
    soft = "soft"  # counted; bounced after MAILER_SOFT_BOUNCE_LIMIT within the window
    complaint = "complaint"  # "report spam": unsubscribed and suppressed
    policy = "policy"  # the receiver refuses the sender (5.7.x): never the subscriber's fault
    ignored = "ignored"  # auto-replies, delivery notices: stored, changes nothing
    unmatched = "unmatched"  # no signed evidence of who: stored, changes nothing


class StoredBounce(Base):
    """Every bounce, complaint or ignored report, once (docs/bounces.md).

    ``fingerprint`` makes ingestion idempotent: the same DSN read twice, or a webhook
    retried by its provider, finds its row and changes nothing more. No foreign keys, like
    ``deliveries``: erasing a subscriber sets ``subscriber_id`` to NULL itself.
    """

    __tablename__ = "bounce_events"
    __table_args__ = (
        Index("ix_bounce_events_blast_kind", "blast_id", "kind"),
        Index("ix_bounce_events_subscriber", "subscriber_id", "kind", "received_at"),
        Index("ix_bounce_events_received", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    report: Mapped[str] = mapped_column(String(16))  # dsn, arf, text, other, smtp, webhook
    source: Mapped[str] = mapped_column(String(40))  # cli, smtp, send, webhook:<provider>
    blast_id: Mapped[int | None] = mapped_column(BigId)
    subscriber_id: Mapped[int | None] = mapped_column(BigId)
    evidence: Mapped[str | None] = mapped_column(String(32))  # what proved who
    status: Mapped[str | None] = mapped_column(String(16))  # enhanced code, e.g. 5.1.1
    code: Mapped[int | None] = mapped_column(Integer)  # SMTP reply code, e.g. 550
    diagnostic: Mapped[str | None] = mapped_column(String(500))
    note: Mapped[str | None] = mapped_column(String(300))  # what was done, or why not
    paused_blast: Mapped[bool] = mapped_column(Boolean, default=False)
    raw_size: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Feed(Base):
    """One of the site's feeds (``MAILER_FEED_URLS``): its cache validators and its health."""

    __tablename__ = "feeds"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    url: Mapped[str] = mapped_column(String(2000), unique=True)
    etag: Mapped[str | None] = mapped_column(String(500))
    last_modified: Mapped[str | None] = mapped_column(String(100))
    last_polled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_ok_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(String(1000))
    last_error_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # False until a poll succeeded: that poll records the backlog as seen, mailing nothing.
    first_run_done: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class FeedEntry(Base):
    """An entry of a feed, seen once: new entries are those with neither a known key
    (guid/id, else the link) nor a known link. Keys and links are matched by their
    SHA-256, so any length fits an index."""

    __tablename__ = "feed_entries"
    __table_args__ = (
        UniqueConstraint("feed_id", "key_hash", name="uq_feed_entries_feed_key"),
        Index("ix_feed_entries_feed_link", "feed_id", "link_hash"),
        Index("ix_feed_entries_pending", "handled_at", "statement_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    feed_id: Mapped[int] = mapped_column(BigId, ForeignKey("feeds.id", ondelete="CASCADE"))
    key_hash: Mapped[str] = mapped_column(String(64))
    entry_key: Mapped[str] = mapped_column(Text)
    link_hash: Mapped[str | None] = mapped_column(String(64))
    link: Mapped[str | None] = mapped_column(String(2000))
    title: Mapped[str | None] = mapped_column(String(300))
    # The statement made from it; NULL for the first run's backlog and for known aliases.
    statement_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("statements.id"))
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # When the mode's action (blast started, editors told) was done; NULL while owed.
    handled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
