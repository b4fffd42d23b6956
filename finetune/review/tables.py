"""The review store's tables (SQLAlchemy 2 declarative models). Alembic's migrations create them; these classes
are what the store reads and writes. Nothing is updated in place except a reviewer's account: a review edit is
a new row with the next version number.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, CheckConstraint, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from finetune.review.schema import Answer, Item, Review, Reviewer, Session


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
        CheckConstraint("thumb IS NULL OR thumb IN ('up', 'down')", name="ck_review_thumb"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("review_items.id"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("reviewers.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    choice: Mapped[str | None] = mapped_column(String(3))
    thumb: Mapped[str | None] = mapped_column(String(4))
    source: Mapped[str] = mapped_column(String(20), default="curator", server_default="curator")
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


class AssignmentRow(Base):
    """An item given to a reviewer (each item goes to K reviewers); the app shows a reviewer only their own."""

    __tablename__ = "review_assignments"
    __table_args__ = (UniqueConstraint("item_id", "reviewer_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("review_items.id"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("reviewers.id"), index=True)
    assigned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class ConversationRow(Base):
    """A served answer kept for feedback when conversation logging is on (PII-scrubbed, deleted when expired)."""

    __tablename__ = "conversations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    response_id: Mapped[str] = mapped_column(String(100), unique=True)
    model: Mapped[str] = mapped_column(Text)
    messages: Mapped[list] = mapped_column(JSON)
    answer: Mapped[str] = mapped_column(Text)
    generation: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


# --- rows to the store's boundary models ----------------------------------------------------


def as_utc(moment: datetime) -> datetime:
    """A time to compare with stored ones: SQLite keeps UTC without its zone, so compare in UTC without it."""
    moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


def aware(moment: datetime) -> datetime:
    """SQLite hands times back without their zone; the store writes UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def session_model(row: SessionRow) -> Session:
    fields = {c: getattr(row, c) for c in Session.model_fields if c not in ("dimensions", "created_at")}
    return Session.model_validate(fields | {"dimensions": row.dimensions, "created_at": aware(row.created_at)})


def item_model(row: ItemRow, session: str) -> Item:
    answers = [
        Answer(label=a.label, text=a.text, model=a.model, adapter=a.adapter, generation=a.generation or {})
        for a in row.answers
    ]
    return Item(
        id=row.id,
        session=session,
        key=row.key,
        prompt=row.prompt,
        system=row.system,
        answers=answers,
        meta=row.meta or {},
        created_at=aware(row.created_at),
    )


def reviewer_model(row: ReviewerRow) -> Reviewer:
    return Reviewer(pseudonym=row.pseudonym, role=row.role, active=row.active, created_at=aware(row.created_at))


def review_model(row: ReviewRow) -> Review:
    scores: dict[str, dict[str, int]] = {}
    for score in row.scores:
        scores.setdefault(score.answer, {})[score.dimension] = score.value
    return Review(
        id=row.id,
        item_id=row.item_id,
        reviewer=row.reviewer.pseudonym,
        version=row.version,
        created_at=aware(row.created_at),
        scores=scores,
        choice=row.choice,
        corrected_answer=row.corrected_answer,
        flags=list(row.flags or []),
        comment=row.comment,
        thumb=row.thumb,
        source=row.source or "curator",
    )
