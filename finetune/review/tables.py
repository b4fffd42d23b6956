"""The review store's tables (SQLAlchemy 2 declarative models). Alembic's migrations create them; these classes
are what the store reads and writes. Nothing is updated in place except a reviewer's account: a review edit is
a new row with the next version number.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, CheckConstraint, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class SessionRow(Base):
    __tablename__ = "review_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    institution: Mapped[str] = mapped_column(String(200), default="")
    licence: Mapped[str | None] = mapped_column(String(200))
    rights_holder: Mapped[str | None] = mapped_column(String(200))
    consent: Mapped[bool | None] = mapped_column(Boolean)
    dimensions: Mapped[list] = mapped_column(JSON)
    reviewers_per_item: Mapped[int] = mapped_column(Integer, default=3)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    items: Mapped[list[ItemRow]] = relationship(back_populates="session")


class ItemRow(Base):
    __tablename__ = "review_items"
    __table_args__ = (UniqueConstraint("session_id", "key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("review_sessions.id"), index=True)
    key: Mapped[str | None] = mapped_column(String(200))
    prompt: Mapped[str] = mapped_column(Text)
    system: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    session: Mapped[SessionRow] = relationship(back_populates="items")
    answers: Mapped[list[AnswerRow]] = relationship(order_by="AnswerRow.label", lazy="selectin")


class AnswerRow(Base):
    __tablename__ = "review_answers"
    __table_args__ = (UniqueConstraint("item_id", "label"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("review_items.id"), index=True)
    label: Mapped[str] = mapped_column(String(1))
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text)
    adapter: Mapped[str | None] = mapped_column(Text)
    generation: Mapped[dict] = mapped_column(JSON, default=dict)


class ReviewerRow(Base):
    __tablename__ = "reviewers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pseudonym: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20), default="reviewer")
    password_hash: Mapped[str | None] = mapped_column(String(300))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class ReviewRow(Base):
    __tablename__ = "reviews"
    __table_args__ = (
        UniqueConstraint("item_id", "reviewer_id", "version"),
        CheckConstraint("choice IS NULL OR choice IN ('A', 'B', 'tie')", name="ck_review_choice"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("review_items.id"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("reviewers.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    choice: Mapped[str | None] = mapped_column(String(3))
    corrected_answer: Mapped[str | None] = mapped_column(Text)
    flags: Mapped[list] = mapped_column(JSON, default=list)
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    reviewer: Mapped[ReviewerRow] = relationship(lazy="joined")
    scores: Mapped[list[ScoreRow]] = relationship(lazy="selectin")


class ScoreRow(Base):
    __tablename__ = "review_scores"
    __table_args__ = (
        UniqueConstraint("review_id", "answer", "dimension"),
        CheckConstraint("value BETWEEN 1 AND 5", name="ck_score_range"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    review_id: Mapped[int] = mapped_column(ForeignKey("reviews.id"), index=True)
    answer: Mapped[str] = mapped_column(String(1))
    dimension: Mapped[str] = mapped_column(String(100))
    value: Mapped[int] = mapped_column(Integer)
