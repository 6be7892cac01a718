"""Tool approvals remembered per chat: `approval: ask_once_per_chat` asks once, then never again there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

Frozen on purpose: it spells out every column instead of importing `bots.store`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tool_approvals",
        sa.Column("chat_key", sa.String(255), nullable=False),
        sa.Column("tool", sa.String(255), nullable=False),
        sa.Column("approved_by", sa.String(255), nullable=False),
        sa.Column("approved_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("chat_key", "tool", name="pk_tool_approvals"),
    )


def downgrade() -> None:
    op.drop_table("tool_approvals")
