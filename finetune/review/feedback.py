"""Visitor feedback from `wenmai serve` into the review store, where curators see it: each served answer a visitor
rates becomes an item of the served model's visitor session (`visitors-<model>`), and the rating a review by a
pseudonymous visitor (source `visitor`). The conversation log (off unless the server turns it on) keeps scrubbed
answers for a set number of days so feedback can find them, then deletes them.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from finetune.review.schema import Dimension, Item, NewAnswer, NewItem, Review, ReviewInput, SessionSettings
from finetune.review.store import ReviewError, ReviewStore
from finetune.review.tables import ConversationRow, ItemRow, as_utc

Scrub = Callable[[str], str]


class Conversation(BaseModel):
    """A served answer: the request's messages, the answer, and what made it."""

    response_id: str
    model: str
    messages: list[dict]
    answer: str
    generation: dict = Field(default_factory=dict)


class Feedback(BaseModel):
    """What a visitor says about one answer (`POST /v1/feedback`)."""

    model_config = ConfigDict(extra="forbid")
    response_id: str = Field(..., min_length=1, max_length=100, description="The `id` of the chat completion.")
    thumb: Literal["up", "down"] | None = None
    scores: dict[str, StrictInt] = Field(default_factory=dict, description="1-5 per reward dimension.")
    comment: str | None = Field(None, max_length=5000)
    corrected_answer: str | None = Field(None, max_length=20000)
    visitor: str | None = Field(None, max_length=200, description="A visitor id; stored only as a hash.")


class FeedbackError(ReviewError):
    """Feedback the store refuses (an unknown response, a bad score); nothing was stored."""


def visitor_session(model: str) -> str:
    """The review session that holds a served model's visitor feedback."""
    return f"visitors-{model}"


def record_feedback(
    store: ReviewStore,
    conversation: Conversation,
    feedback: Feedback,
    dimensions: list[Dimension],
    scrub: Scrub | None = None,
    rights: dict | None = None,
) -> Review:
    """Store a visitor's feedback on one served answer as a review of that answer's item (made on first feedback).

    Prompts, answers, comments and corrections pass `scrub` (the PII scrub) before they are stored.
    """
    scrub = scrub or (lambda text: text)
    if not (feedback.thumb or feedback.scores or feedback.comment or feedback.corrected_answer):
        raise FeedbackError("empty feedback: give thumb (up or down), scores, a comment or a corrected answer")
    session = visitor_session(conversation.model)
    if not store.has_session(session):
        settings = SessionSettings(name=session, dimensions=dimensions, reviewers_per_item=3, **(rights or {}))
        with contextlib.suppress(ReviewError):  # created by a concurrent request in the same moment
            store.create_session(settings)
    item = _item(store, session, conversation, scrub)
    visitor = "visitor-" + hashlib.sha256((feedback.visitor or conversation.response_id).encode()).hexdigest()[:12]
    if store.reviewer(visitor) is None:
        with contextlib.suppress(ReviewError):
            store.add_reviewer(visitor, "visitor")
    review = ReviewInput(
        scores={"A": feedback.scores} if feedback.scores else {},
        thumb=feedback.thumb,
        comment=scrub(feedback.comment) if feedback.comment else None,
        corrected_answer=scrub(feedback.corrected_answer) if feedback.corrected_answer else None,
    )
    try:
        return store.submit_review(item.id, visitor, review, source="visitor")
    except ReviewError as err:
        raise FeedbackError(str(err)) from None


def log_conversation(store: ReviewStore, conversation: Conversation, days: int, scrub: Scrub) -> None:
    """Keep a scrubbed served answer for `days` days (conversation logging on)."""
    now = datetime.now(timezone.utc)
    messages = [{**m, "content": scrub(str(m.get("content", "")))} for m in conversation.messages]
    with store.transaction() as db:
        db.add(
            ConversationRow(
                response_id=conversation.response_id,
                model=conversation.model,
                messages=messages,
                answer=scrub(conversation.answer),
                generation=conversation.generation,
                created_at=now,
                expires_at=now + timedelta(days=days),
            )
        )


def logged_conversation(store: ReviewStore, response_id: str) -> Conversation | None:
    """A logged, unexpired conversation by its response id."""
    with store.transaction(write=False) as db:
        row = db.scalar(select(ConversationRow).where(ConversationRow.response_id == response_id))
        if row is None or as_utc(row.expires_at) <= as_utc(datetime.now(timezone.utc)):
            return None
        return Conversation(
            response_id=row.response_id,
            model=row.model,
            messages=row.messages,
            answer=row.answer,
            generation=row.generation,
        )


def purge_conversations(store: ReviewStore, now: datetime | None = None) -> int:
    """Delete logged conversations past their retention; returns how many."""
    moment = as_utc(now or datetime.now(timezone.utc))
    with store.transaction() as db:
        return db.execute(delete(ConversationRow).where(ConversationRow.expires_at <= moment)).rowcount or 0


def _item(store: ReviewStore, session: str, conversation: Conversation, scrub: Scrub) -> Item:
    """The item of this response in the visitor session, made on its first feedback."""
    session_id = store.session(session).id
    found = _item_id(store, session_id, conversation.response_id)
    if found is not None:
        return store.item(found)
    system = next((m["content"] for m in conversation.messages if m.get("role") == "system"), None)
    users = [m for m in conversation.messages if m.get("role") == "user"]
    if not users:
        raise FeedbackError(f"response {conversation.response_id} has no user message to review")
    earlier = conversation.messages[: conversation.messages.index(users[-1])]
    new = NewItem(
        key=conversation.response_id,
        prompt=scrub(str(users[-1]["content"])),
        system=scrub(system) if system else None,
        answers=[
            NewAnswer(text=scrub(conversation.answer), model=conversation.model, generation=conversation.generation)
        ],
        meta={"source": "visitor feedback", "history": [{**m, "content": scrub(str(m["content"]))} for m in earlier]},
    )
    try:
        return store.add_items(session, [new])[0]
    except (ReviewError, IntegrityError):  # another visitor's feedback made it in the same moment
        return store.item(_item_id(store, session_id, conversation.response_id))


def _item_id(store: ReviewStore, session_id: int, response_id: str) -> int | None:
    """The id of the response's item in the session, if it has one."""
    with store.transaction(write=False) as db:
        return db.scalar(select(ItemRow.id).where(ItemRow.session_id == session_id, ItemRow.key == response_id))
