"""Small facts the replicas of a cluster agree on (`bots.cluster`): e.g. the webhook set.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05

Frozen on purpose: it spells out every column instead of importing `bots.store`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cluster_state",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_cluster_state"),
    )


def downgrade() -> None:
    op.drop_table("cluster_state")
