"""promises kept to the letter: first deadline, resolution target, waiting on the customer, skipped items

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 02:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

import storage.types
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"  # re-chained after main's head (0001 -> 0005 -> 0003) on merge
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("first_due_at", storage.types.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("resolution_due_at", storage.types.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("waiting_since", storage.types.UTCDateTime(timezone=True), nullable=True))
    # While a conversation is in its first cycle, its due_at is the first deadline; later cycles
    # have overwritten it, and readers recompute it from the policy (bot.flow.conversations).
    op.execute("UPDATE conversations SET first_due_at = due_at WHERE cycle = 0")
    op.create_table(
        "skipped_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("at", storage.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("external_id", sa.String(length=200), nullable=True),
        sa.Column("field", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("raw", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_skipped_items_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_skipped_items")),
    )
    with op.batch_alter_table("skipped_items", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_skipped_items_account_id"), ["account_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("skipped_items", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_skipped_items_account_id"))
    op.drop_table("skipped_items")
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_column("waiting_since")
        batch_op.drop_column("resolution_due_at")
        batch_op.drop_column("first_due_at")
