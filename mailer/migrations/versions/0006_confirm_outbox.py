"""confirm outbox: a confirmation mail owed is a row in SQL, not only a job in Redis

``subscribers.confirm_due_at`` says when a confirmation mail is owed (NULL: none),
``confirm_attempts`` how often sending it failed since; ``confirm_sent_at`` now means
when the relay last accepted one. The reconciler queues every due mail that has no
live job, so a flushed Redis, a process that died between the INSERT and the enqueue,
or a policy refusal no longer leaves anyone pending forever (docs/security.md).

Mails the old code claimed in the last 7 days (the default lifetime of a confirm link)
but never recorded as sent or refused are owed now: jobs lost in Redis, policy
refusals, and jobs still queued at the upgrade, which were pickled and which the new
worker refuses to read.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

OWED_FOR = timedelta(days=7)


def upgrade() -> None:
    with op.batch_alter_table("subscribers") as batch:
        batch.add_column(sa.Column("confirm_due_at", sa.DateTime(timezone=True)))
        batch.add_column(
            sa.Column("confirm_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch.create_index("ix_subscribers_confirm_due_at", ["confirm_due_at"])
    subscribers = sa.table(
        "subscribers",
        sa.column("id", sa.Integer),
        sa.column("status", sa.String),
        sa.column("confirm_sent_at", sa.DateTime(timezone=True)),
        sa.column("confirm_due_at", sa.DateTime(timezone=True)),
        sa.column("resubscribe_requested_at", sa.DateTime(timezone=True)),
    )
    events = sa.table(
        "subscriber_events",
        sa.column("subscriber_id", sa.Integer),
        sa.column("kind", sa.String),
        sa.column("at", sa.DateTime(timezone=True)),
    )
    now = datetime.now(UTC)
    settled = (
        sa.select(sa.literal(1))
        .where(
            events.c.subscriber_id == subscribers.c.id,
            events.c.kind.in_(("confirmation_sent", "confirmation_failed")),
            events.c.at >= subscribers.c.confirm_sent_at,
        )
        .exists()
    )
    awaiting = sa.or_(
        subscribers.c.status == "pending",
        sa.and_(
            subscribers.c.status.in_(("unsubscribed", "bounced")),
            subscribers.c.resubscribe_requested_at.is_not(None),
        ),
    )
    op.execute(
        subscribers.update()
        .where(awaiting, subscribers.c.confirm_sent_at >= now - OWED_FOR, ~settled)
        .values(confirm_due_at=now)
    )


def downgrade() -> None:
    with op.batch_alter_table("subscribers") as batch:
        batch.drop_index("ix_subscribers_confirm_due_at")
        batch.drop_column("confirm_attempts")
        batch.drop_column("confirm_due_at")
