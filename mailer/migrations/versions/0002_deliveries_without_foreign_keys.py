"""deliveries without foreign keys; index on subscriber_id

The two per-row foreign-key checks dominated the audience snapshot of a large blast on
PostgreSQL; the code keeps their guarantees (see models.Delivery). Erasing a subscriber
looks its deliveries up by subscriber_id, hence the index.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_constraint("fk_deliveries_blast_id_blasts", type_="foreignkey")
        batch.drop_constraint("fk_deliveries_subscriber_id_subscribers", type_="foreignkey")
        batch.create_index("ix_deliveries_subscriber", ["subscriber_id"])


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_subscriber")
        batch.create_foreign_key(
            "fk_deliveries_subscriber_id_subscribers",
            "subscribers",
            ["subscriber_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch.create_foreign_key(
            "fk_deliveries_blast_id_blasts", "blasts", ["blast_id"], ["id"], ondelete="CASCADE"
        )
    _ = sa
