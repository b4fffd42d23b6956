"""The review store: sessions, items, answers, reviewers, versioned reviews and their scores.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "review_sessions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("institution", sa.String(200), nullable=False),
        sa.Column("licence", sa.String(200)),
        sa.Column("rights_holder", sa.String(200)),
        sa.Column("consent", sa.Boolean),
        sa.Column("dimensions", sa.JSON, nullable=False),
        sa.Column("reviewers_per_item", sa.Integer, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
    )
    op.create_table(
        "review_items",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("session_id", sa.Integer, sa.ForeignKey("review_sessions.id"), nullable=False, index=True),
        sa.Column("key", sa.String(200)),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("system", sa.Text),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.UniqueConstraint("session_id", "key"),
    )
    op.create_table(
        "review_answers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("item_id", sa.Integer, sa.ForeignKey("review_items.id"), nullable=False, index=True),
        sa.Column("label", sa.String(1), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("adapter", sa.Text),
        sa.Column("generation", sa.JSON, nullable=False),
        sa.UniqueConstraint("item_id", "label"),
    )
    op.create_table(
        "reviewers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("pseudonym", sa.String(100), nullable=False, unique=True),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("password_hash", sa.String(300)),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("item_id", sa.Integer, sa.ForeignKey("review_items.id"), nullable=False, index=True),
        sa.Column("reviewer_id", sa.Integer, sa.ForeignKey("reviewers.id"), nullable=False, index=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("choice", sa.String(3)),
        sa.Column("corrected_answer", sa.Text),
        sa.Column("flags", sa.JSON, nullable=False),
        sa.Column("comment", sa.Text),
        sa.Column("created_at", TIME, nullable=False),
        sa.UniqueConstraint("item_id", "reviewer_id", "version"),
        sa.CheckConstraint("choice IS NULL OR choice IN ('A', 'B', 'tie')", name="ck_review_choice"),
    )
    op.create_table(
        "review_scores",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("review_id", sa.Integer, sa.ForeignKey("reviews.id"), nullable=False, index=True),
        sa.Column("answer", sa.String(1), nullable=False),
        sa.Column("dimension", sa.String(100), nullable=False),
        sa.Column("value", sa.Integer, nullable=False),
        sa.UniqueConstraint("review_id", "answer", "dimension"),
        sa.CheckConstraint("value BETWEEN 1 AND 5", name="ck_score_range"),
    )


def downgrade() -> None:
    for table in ("review_scores", "reviews", "reviewers", "review_answers", "review_items", "review_sessions"):
        op.drop_table(table)
