"""Each person's model in a chat (`chat.model_choice: per_user`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05

Frozen on purpose: it spells out every column instead of importing `bots.store`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_choices",
        sa.Column("chat_key", sa.String(255), nullable=False),
        sa.Column("user_key", sa.String(255), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("chosen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("chat_key", "user_key", name="pk_model_choices"),
    )


def downgrade() -> None:
    op.drop_table("model_choices")
