"""The `data.augment` section: counterfactual augmentation of training data with a list of term pairs.

The method is `finetune/data/augment.py`; the `debias` stage can derive a record's protected attribute
from the same pairs (side a or side b).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

AUGMENT_FORMATS = ("chat", "instruction", "text")


class AugmentSection(BaseModel):
    """Counterfactual copies of training records with group terms swapped (he <-> she, 男 <-> 女, 汉族 <-> 藏族)."""

    model_config = ConfigDict(extra="forbid")

    pairs: list[list[str]] = Field(
        ...,
        min_length=1,
        description="Term pairs `[a, b]`; every a becomes b and every b becomes a. Chinese terms match anywhere "
        "(no word boundaries), the longest term first; Latin terms only as whole words, case kept. When a "
        "term is in two pairs (her: his/him), the first pair decides.",
    )
    protect: list[str] = Field(
        default_factory=list,
        description="Words and names that contain a term but are never changed (其他, 他人, 男爵, 王女士, Hermitage).",
    )
    datasets: list[str] | None = Field(
        None,
        description="Datasets to augment (default: every chat, instruction or text dataset a stage trains on; "
        "never an eval set).",
    )

    @field_validator("pairs")
    @classmethod
    def _two_sides(cls, pairs: list[list[str]]) -> list[list[str]]:
        for i, pair in enumerate(pairs):
            if len(pair) != 2:
                raise ValueError(f"pair {i} {pair!r} has {len(pair)} terms; a pair is [a, b]")
            if any(not term.strip() for term in pair):
                raise ValueError(f"pair {i} {pair!r} has an empty side; give both terms, e.g. [他, 她]")
            if pair[0].strip().lower() == pair[1].strip().lower():
                raise ValueError(f"pair {i} {pair!r} swaps a term with itself")
        return [[term.strip() for term in pair] for pair in pairs]

    @model_validator(mode="after")
    def _protect_is_not_a_term(self) -> AugmentSection:
        terms = {term.lower() for pair in self.pairs for term in pair}
        both = sorted(word for word in self.protect if word.lower() in terms)
        if both:
            raise ValueError(f"{', '.join(both)} is both a term to swap and a protected word; keep it in one list")
        if any(not word.strip() for word in self.protect):
            raise ValueError("a protected word is empty")
        return self
