"""bounce_events: every bounce, complaint and ignored report, once

See docs/bounces.md. ``fingerprint`` is unique so the same report ingested twice is
stored (and acted on) once. No foreign keys, like ``deliveries``: erasing a subscriber
detaches its rows itself (mailer/privacy.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# A migration is frozen: it spells its types out instead of importing the models.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bounce_events",
        sa.Column("id", BigId, nullable=False),
        sa.Column("fingerprint", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("report", sa.String(16), nullable=False),
        sa.Column("source", sa.String(40), nullable=False),
        sa.Column("blast_id", BigId, nullable=True),
        sa.Column("subscriber_id", BigId, nullable=True),
        sa.Column("evidence", sa.String(32), nullable=True),
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("code", sa.Integer(), nullable=True),
        sa.Column("diagnostic", sa.String(500), nullable=True),
        sa.Column("note", sa.String(300), nullable=True),
        sa.Column("paused_blast", sa.Boolean(), nullable=False),
        sa.Column("raw_size", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_bounce_events"),
        sa.UniqueConstraint("fingerprint", name="uq_bounce_events_fingerprint"),
    )
    op.create_index("ix_bounce_events_blast_kind", "bounce_events", ["blast_id", "kind"])
    op.create_index(
        "ix_bounce_events_subscriber", "bounce_events", ["subscriber_id", "kind", "received_at"]
    )
    op.create_index("ix_bounce_events_received", "bounce_events", ["received_at"])


def downgrade() -> None:
    op.drop_table("bounce_events")
