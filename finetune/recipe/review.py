"""How feedback from the review store is cleaned before it trains: the options a `format: review` dataset and
`wenmai review export` share. Imports pydantic only (the recipe schema uses it).
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_DB = "review.db"  # the embedded SQLite store, in the current folder
Flag = Literal["factual_error", "sensitive", "rights_problem"]
FLAGS: tuple[str, ...] = get_args(Flag)
ReviewRecords = Literal["ratings", "pairs", "chat"]


class ReviewCleaning(BaseModel):
    """Noise and subjectivity taken out of expert scores: per-rater calibration, held-back items, noisy raters."""

    model_config = ConfigDict(extra="forbid")
    calibrate: bool = Field(
        True,
        description="Correct each rater's offset and scale against the consensus (a strict rater's 3 is a lenient "
        "rater's 4) before scores are exported.",
    )
    max_spread: float = Field(
        2.0,
        ge=0,
        description="Hold back an item when its raters' scores on one dimension differ by more than this many "
        "points (calibrated scores are rounded to whole points first).",
    )
    max_rater_deviation: float = Field(
        1.0,
        gt=0,
        description="List a rater whose scores sit on average more than this many points from the other raters' "
        "median (after removing the rater's own offset).",
    )
    drop_noisy_raters: bool = Field(
        True, description="Leave the listed noisy raters' scores out of the export (they stay in the store)."
    )
    min_reviews: int = Field(1, ge=1, description="Hold back an item with fewer reviews than this.")
    hold_flags: list[Flag] = Field(
        default_factory=lambda: ["sensitive", "rights_problem"],
        description="Flags that hold an item back for a curator's decision. Without it here, factual_error still "
        "stops a pair whose preferred answer a reviewer flagged (the better of two wrong answers teaches nothing).",
    )
    teacher_gap: float = Field(
        1.5,
        gt=0,
        description="With a reward model as teacher: list items where the teacher's and the experts' standardised "
        "scores differ by more than this many standard deviations (listed for a second look, never dropped).",
    )
