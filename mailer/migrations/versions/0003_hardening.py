"""hardening: a pending re-sign-up is tracked beside an unsubscribed or bounced row

A stranger posting the address of someone who left used to flip the row back to
``pending``, which a ``--confirmed`` import then turned into ``confirmed``. Now the row
keeps its status and ``resubscribe_requested_at`` records the request; only a click on
a confirmation link mailed after it brings the person back (docs/security.md).

Rows the old code had already flipped (pending, with an unsubscribe or bounce on
record) are put back the new way: their status is the latest of the two, the request
is kept, and a confirmation link mailed since still works exactly as before.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("subscribers") as batch:
        batch.add_column(sa.Column("resubscribe_requested_at", sa.DateTime(timezone=True)))
    subscribers = sa.table(
        "subscribers",
        sa.column("status", sa.String),
        sa.column("unsubscribed_at", sa.DateTime(timezone=True)),
        sa.column("bounced_at", sa.DateTime(timezone=True)),
        sa.column("confirm_sent_at", sa.DateTime(timezone=True)),
        sa.column("updated_at", sa.DateTime(timezone=True)),
        sa.column("resubscribe_requested_at", sa.DateTime(timezone=True)),
    )
    flipped = sa.and_(
        subscribers.c.status == "pending",
        sa.or_(subscribers.c.unsubscribed_at.is_not(None), subscribers.c.bounced_at.is_not(None)),
    )
    bounced_last = sa.and_(
        subscribers.c.bounced_at.is_not(None),
        sa.or_(
            subscribers.c.unsubscribed_at.is_(None),
            subscribers.c.bounced_at > subscribers.c.unsubscribed_at,
        ),
    )
    op.execute(
        subscribers.update()
        .where(flipped)
        .values(
            status=sa.case((bounced_last, "bounced"), else_="unsubscribed"),
            resubscribe_requested_at=sa.func.coalesce(
                subscribers.c.confirm_sent_at, subscribers.c.updated_at
            ),
        )
    )


def downgrade() -> None:
    subscribers = sa.table(
        "subscribers",
        sa.column("status", sa.String),
        sa.column("resubscribe_requested_at", sa.DateTime(timezone=True)),
    )
    # The old schema's way to say "signed up again, not confirmed yet".
    op.execute(
        subscribers.update()
        .where(subscribers.c.resubscribe_requested_at.is_not(None))
        .where(subscribers.c.status.in_(("unsubscribed", "bounced")))
        .values(status="pending")
    )
    with op.batch_alter_table("subscribers") as batch:
        batch.drop_column("resubscribe_requested_at")
