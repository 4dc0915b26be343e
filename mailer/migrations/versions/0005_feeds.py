"""feeds and their entries; statements.source; editors.email

Statements can now come from the campaign site's feeds (mailer/feeds.py): ``feeds`` keeps
each feed's cache validators and health, ``feed_entries`` every entry seen (the first
poll's backlog included, so it is never mailed). Editors get an optional address for the
"new statement on the site" notice.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "feeds",
        sa.Column("id", BigId, nullable=False),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column("etag", sa.String(length=500), nullable=True),
        sa.Column("last_modified", sa.String(length=100), nullable=True),
        sa.Column("last_polled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_ok_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=1000), nullable=True),
        sa.Column("last_error_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_run_done", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feeds")),
        sa.UniqueConstraint("url", name=op.f("uq_feeds_url")),
    )
    op.create_table(
        "feed_entries",
        sa.Column("id", BigId, nullable=False),
        sa.Column("feed_id", BigId, nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("entry_key", sa.Text(), nullable=False),
        sa.Column("link_hash", sa.String(length=64), nullable=True),
        sa.Column("link", sa.String(length=2000), nullable=True),
        sa.Column("title", sa.String(length=300), nullable=True),
        sa.Column("statement_id", BigId, nullable=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["feed_id"],
            ["feeds.id"],
            name=op.f("fk_feed_entries_feed_id_feeds"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["statement_id"],
            ["statements.id"],
            name=op.f("fk_feed_entries_statement_id_statements"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feed_entries")),
        sa.UniqueConstraint("feed_id", "key_hash", name="uq_feed_entries_feed_key"),
    )
    with op.batch_alter_table("feed_entries") as batch:
        batch.create_index("ix_feed_entries_feed_link", ["feed_id", "link_hash"])
        batch.create_index("ix_feed_entries_pending", ["handled_at", "statement_id"])
    with op.batch_alter_table("statements") as batch:
        batch.add_column(sa.Column("source", sa.String(length=16), nullable=True))
    with op.batch_alter_table("editors") as batch:
        batch.add_column(sa.Column("email", sa.String(length=320), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("editors") as batch:
        batch.drop_column("email")
    with op.batch_alter_table("statements") as batch:
        batch.drop_column("source")
    op.drop_table("feed_entries")
    op.drop_table("feeds")
