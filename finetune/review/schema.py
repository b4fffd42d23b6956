"""What goes into and comes out of the review store, as pydantic models (no SQLAlchemy: light to import)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from finetune.recipe.review import FLAGS, Flag

ANSWER_LABELS = ("A", "B")
Choice = Literal["A", "B", "tie"]
Role = Literal["reviewer", "admin", "visitor"]  # a visitor gives feedback through `wenmai serve`; no sign-in
Source = Literal["curator", "visitor"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dimension(_Model):
    """A reward dimension as reviewers see it: the name, and its description as the rubric."""

    name: str
    description: str = ""
    weight: float = 1.0


class SessionSettings(_Model):
    """A review session: who holds the rights to what is reviewed, and what reviewers score."""

    name: str = Field(..., min_length=1, max_length=200)
    institution: str = ""
    licence: str | None = None
    rights_holder: str | None = None
    consent: bool | None = Field(
        None, description="Reviewers agreed that their (pseudonymous) judgements may train models."
    )
    dimensions: list[Dimension] = Field(..., min_length=1)
    reviewers_per_item: int = Field(3, ge=1, description="K: how many reviewers each item is given to.")
    description: str = ""

    @property
    def dimension_names(self) -> list[str]:
        return [d.name for d in self.dimensions]


class Session(SessionSettings):
    id: int
    created_at: datetime


class NewAnswer(_Model):
    """An answer to review and what made it."""

    text: str
    model: str = Field(..., description="The model folder, run stage or export that generated it.")
    adapter: str | None = None
    generation: dict = Field(default_factory=dict, description="Generation settings (max_new_tokens, sampling).")


class NewItem(_Model):
    """A prompt and one answer (rating) or two (A/B)."""

    key: str | None = Field(None, description="The prompt's id in its file (kept for tracing).")
    prompt: str = Field(..., min_length=1)
    system: str | None = None
    answers: list[NewAnswer] = Field(..., min_length=1, max_length=2)
    meta: dict = Field(default_factory=dict)


class Answer(NewAnswer):
    label: str


class Item(_Model):
    id: int
    session: str
    key: str | None
    prompt: str
    system: str | None
    answers: list[Answer]
    meta: dict
    created_at: datetime


class Reviewer(_Model):
    pseudonym: str
    role: Role
    active: bool
    created_at: datetime


class ReviewInput(_Model):
    """A reviewer's judgement of one item: scores 1-5 per answer and dimension, A/B/tie, a correction, flags."""

    scores: dict[str, dict[str, StrictInt]] = Field(
        default_factory=dict, description="{answer label: {dimension: 1..5}}; e.g. {'A': {'accuracy': 4}}."
    )
    choice: Choice | None = None
    corrected_answer: str | None = None
    flags: list[Flag] = Field(default_factory=list)
    comment: str | None = None
    thumb: Literal["up", "down"] | None = Field(None, description="A visitor's thumbs up or down on the answer.")


class Review(ReviewInput):
    """A stored version of a review; exports read each reviewer's latest version of each item."""

    id: int
    item_id: int
    reviewer: str
    version: int
    created_at: datetime
    source: Source = "curator"


__all__ = [
    "ANSWER_LABELS",
    "FLAGS",
    "Answer",
    "Choice",
    "Dimension",
    "Item",
    "NewAnswer",
    "NewItem",
    "Review",
    "ReviewInput",
    "Reviewer",
    "Role",
    "Session",
    "SessionSettings",
]
