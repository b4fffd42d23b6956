"""Preference record formats (pairs, ratings, tiers), checked record by record like the SFT formats.

Records that name reward dimensions or tiers are checked against the recipe through the validation
context (`{"dimensions": [...], "tier_order": [...]}`), so an unknown name is reported at its file:line.
hh-rlhf style transcripts (`\\n\\nHuman: ... \\n\\nAssistant: ...`) are split into a prompt conversation
and the final response here, so every later step sees one shape: prompt, chosen, rejected.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from finetune.errors import DataError
from finetune.recipe import reward_dimensions

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
SCORE_RANGE = (1.0, 5.0)


class PromptMessage(BaseModel):
    """A turn of a prompt conversation (earlier assistant turns may be empty in real transcripts)."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


Prompt = str | list[PromptMessage]


class PairsRecord(BaseModel):
    """`prompt`, `chosen`, `rejected` (or two full transcripts), optional `dimension` and `margin`."""

    model_config = ConfigDict(extra="allow")
    prompt: Prompt | None = None
    chosen: str
    rejected: str
    dimension: str | None = None
    margin: float = Field(
        0.0, ge=0, description="How much better chosen is (used when the reward stage sets margin_scale)."
    )

    @model_validator(mode="after")
    def _split_and_check(self, info: ValidationInfo) -> PairsRecord:
        if self.prompt is None:
            prompt, self.chosen, self.rejected = split_pair(self.chosen, self.rejected)
            self.prompt = [PromptMessage(**m) for m in transcript_messages(prompt)]
        _check_prompt(self.prompt)
        if self.chosen.strip() == self.rejected.strip():
            raise ValueError("chosen and rejected are identical; a pair needs two different responses")
        _check_dimension(self.dimension, info, "dimension")
        return self


class RatingsRecord(BaseModel):
    """`prompt`, `response`, `scores` {dimension: 1..5}, optional `rater`."""

    model_config = ConfigDict(extra="allow")
    prompt: Prompt
    response: str = Field(..., min_length=1)
    scores: dict[str, float] = Field(..., min_length=1)
    rater: str | None = None

    @field_validator("scores")
    @classmethod
    def _in_range(cls, scores: dict[str, float]) -> dict[str, float]:
        low, high = SCORE_RANGE
        outside = [f"{name}={value:g}" for name, value in scores.items() if not low <= value <= high]
        if outside:
            raise ValueError(f"{', '.join(outside)} outside {low:g}..{high:g} (1 = worst, 5 = best)")
        return scores

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> RatingsRecord:
        _check_prompt(self.prompt)
        for name in self.scores:
            _check_dimension(name, info, "scores")
        return self


class TierResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    response: str = Field(..., min_length=1)
    tier: str


class TiersRecord(BaseModel):
    """`prompt` and `responses` [{response, tier}]; tiers are ranked by the dataset's `tier_order`."""

    model_config = ConfigDict(extra="allow")
    prompt: Prompt
    responses: list[TierResponse] = Field(..., min_length=2)
    dimension: str | None = None

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> TiersRecord:
        _check_prompt(self.prompt)
        _check_dimension(self.dimension, info, "dimension")
        order = (info.context or {}).get("tier_order")
        if order:
            for i, item in enumerate(self.responses):
                if item.tier not in order:
                    raise ValueError(
                        f"responses[{i}].tier: unknown tier {item.tier!r}; the dataset's tier_order is {', '.join(order)}"
                    )
        texts = [r.response.strip() for r in self.responses]
        repeated = sorted({t for t in texts if texts.count(t) > 1})
        if repeated:
            raise ValueError(f"the same response appears twice: {repeated[0][:60]!r}")
        if len({r.tier for r in self.responses}) < 2:
            raise ValueError(
                f"every response is in tier {self.responses[0].tier!r}; no pairs can be formed from one tier"
            )
        return self


PREFERENCE_MODELS: dict[str, type[BaseModel]] = {"pairs": PairsRecord, "ratings": RatingsRecord, "tiers": TiersRecord}


def check_record_set(fmt: str, records: list[dict], path: str) -> None:
    """Whole-file checks: a ratings file must rate at least two different responses to one prompt."""
    if fmt != "ratings" or not records:
        return
    responses: dict[str, set[str]] = defaultdict(set)
    for record in records:
        responses[prompt_key(record["prompt"])].add(record["response"].strip())
    if max(len(r) for r in responses.values()) < 2:
        raise DataError(
            f"{path}: no prompt has two or more different responses, so no pairs can be formed "
            f"({len(responses)} prompts, one response each). Ratings become pairs by comparing responses "
            "to the same prompt: rate at least two responses per prompt."
        )


def record_context(recipe: Any, name: str) -> dict:
    """What the records of the recipe's dataset `name` are checked against: reward dimensions and tier order."""

    return {"dimensions": [d.name for d in reward_dimensions(recipe)], "tier_order": recipe.data[name].tier_order}


def split_transcript(text: str) -> tuple[str, str]:
    """Split an hh-rlhf transcript after its last `\\n\\nAssistant:`: (prompt including the marker, response)."""
    at = text.rfind(ASSISTANT)
    if at < 0:
        raise ValueError(
            f"no {ASSISTANT.strip()!r} turn in the transcript; give `prompt` separately or a full transcript"
        )
    end = at + len(ASSISTANT)
    return text[:end], text[end:].strip()


def split_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two transcripts of one conversation: (shared prompt, chosen response, rejected response).

    The split is the last `\\n\\nAssistant:` inside their common prefix, which is each transcript's last one
    unless a response itself contains that marker (a few hh-rlhf responses do).
    """
    common = os.path.commonprefix([chosen, rejected])
    at = common.rfind(ASSISTANT)
    if at < 0:
        if ASSISTANT not in chosen or ASSISTANT not in rejected:
            raise ValueError(
                f"no `prompt` field and no {ASSISTANT.strip()!r} turn in chosen/rejected; "
                "give `prompt` separately or full transcripts"
            )
        raise ValueError(
            "chosen and rejected transcripts do not share their conversation before the last Assistant turn"
        )
    end = at + len(ASSISTANT)
    return chosen[:end], chosen[end:].strip(), rejected[end:].strip()


def transcript_messages(prompt: str) -> list[dict[str, str]]:
    """A `\\n\\nHuman: ... \\n\\nAssistant:` prompt as chat messages (text before the first turn becomes a system turn)."""
    parts = re.split(r"\n\n(Human|Assistant):", prompt)
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # the open slot the response fills
    if not any(m["role"] == "user" for m in messages):
        raise ValueError(f"the transcript has no {HUMAN.strip()!r} turn before the response")
    return messages


def prompt_messages(prompt: str | list[dict]) -> list[dict[str, str]]:
    """A record's prompt as chat messages: a string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def prompt_key(prompt: str | list[dict]) -> str:
    """A hashable identity for a prompt (responses to the same prompt are compared)."""
    return json.dumps(prompt_messages(prompt), ensure_ascii=False, sort_keys=True)


def _check_prompt(prompt: Any) -> None:
    messages = prompt_messages(prompt if isinstance(prompt, str) else [m.model_dump() for m in prompt])
    if not any(m["content"].strip() for m in messages):
        raise ValueError("prompt is empty")
    if messages[-1]["role"] == "assistant":
        raise ValueError("a prompt conversation must end with a user (or system) turn, not an assistant turn")


def _check_dimension(name: str | None, info: ValidationInfo, key: str) -> None:
    declared = (info.context or {}).get("dimensions")
    if name is None or declared is None or name in declared:
        return
    import difflib

    guess = difflib.get_close_matches(name, declared, n=1, cutoff=0.6)
    hint = f"did you mean {guess[0]}? " if guess else ""
    raise ValueError(
        f"{key}: unknown reward dimension {name!r}; {hint}the recipe declares: {', '.join(declared)} "
        "(add it to the `reward` section or fix the record)"
    )
