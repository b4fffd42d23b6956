"""Visitor feedback: a review's thumb and source, visitor accounts, and the conversation log (kept N days).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reviews") as table:
        table.add_column(sa.Column("thumb", sa.String(4)))
        table.add_column(sa.Column("source", sa.String(20), nullable=False, server_default="curator"))
        table.create_check_constraint("ck_review_thumb", "thumb IS NULL OR thumb IN ('up', 'down')")
    op.create_table(
        "conversations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("response_id", sa.String(100), nullable=False, unique=True),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("messages", sa.JSON, nullable=False),
        sa.Column("answer", sa.Text, nullable=False),
        sa.Column("generation", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("conversations")
    with op.batch_alter_table("reviews") as table:
        table.drop_constraint("ck_review_thumb", type_="check")
        table.drop_column("source")
        table.drop_column("thumb")
