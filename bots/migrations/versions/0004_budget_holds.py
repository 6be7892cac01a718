"""Budget holds: tokens reserved by running turns of users with a daily budget.

A turn of a user with a budget reserves an estimate of what it may use (its prompt plus
the completion allowance) before the model is called, in the same transaction that
checks the budget and starts the turn; the hold is replaced by the real usage when the
turn finishes. Without holds, five turns started at once each saw the budget unspent and
together used five times what one may. One row per turn (the turn's id is the key); a
hold no longer counts once its turn stopped running or `expires_at` passed (a process
that died mid-turn).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

Frozen on purpose: it spells out every column instead of importing `bots.store`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "budget_holds",
        sa.Column("turn_id", _ID, nullable=False),
        sa.Column("user_key", sa.String(255), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("turn_id", name="pk_budget_holds"),
        sa.ForeignKeyConstraint(
            ["turn_id"], ["turns.id"], name="fk_budget_holds_turn_id_turns", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_budget_holds_user_key", "budget_holds", ["user_key"])


def downgrade() -> None:
    op.drop_index("ix_budget_holds_user_key", table_name="budget_holds")
    op.drop_table("budget_holds")
