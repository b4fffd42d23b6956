"""Options of the `rlhf` stage (the method: `finetune/stages/rlhf.py`), with its rule rewards.

The rule rewards' scoring functions are in `reward/rules.py`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from finetune.recipe.options import TrainingOptions, dataset_field, dimension_field, input_field
from finetune.recipe.sections import reward_dimensions

if TYPE_CHECKING:
    from finetune.recipe.schema import Recipe

PROMPT_FORMATS = ("chat", "instruction", "pairs", "ratings", "tiers")


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LengthRule(_Rule):
    """Answers between min_chars and max_chars get 0; outside, they lose up to 1 in proportion to how far off they are."""

    min_chars: int = Field(0, ge=0, description="Shortest answer, in characters, that loses nothing.")
    max_chars: int | None = Field(
        None, gt=0, description="Longest answer, in characters, that loses nothing (none: no upper bound)."
    )
    weight: float = Field(0.5, ge=0, description="Weight of this rule in the reward.")

    @model_validator(mode="after")
    def _ordered(self) -> LengthRule:
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")
        return self


class FormatRule(_Rule):
    """Answers matching a regular expression (anywhere in the answer) get 1, others 0."""

    pattern: str = Field(
        ..., min_length=1, description="Python regular expression the answer should contain (e.g. `出处[:：]`)."
    )
    weight: float = Field(0.5, ge=0, description="Weight of this rule in the reward.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from None
        return pattern


class BannedTermsRule(_Rule):
    """Answers containing any term of the institution's list get -1, others 0."""

    path: str = Field(
        ...,
        description="Text file of banned terms, one per line (`#` starts a comment); Latin words "
        "match whole words, any case; other terms match anywhere.",
        json_schema_extra={"is_path": True},
    )
    weight: float = Field(1.0, ge=0, description="Weight of this rule in the reward.")


class RuleRewards(_Rule):
    """Rule-based rewards added to the reward model's dimensions (each optional)."""

    length: LengthRule | None = Field(None, description="Keep answers within a length range.")
    format: FormatRule | None = Field(None, description="Reward answers that contain a required pattern.")
    banned_terms: BannedTermsRule | None = Field(None, description="Penalise answers that use a banned term.")

    def given(self) -> list[str]:
        """The names of the rules that are set."""
        return [name for name in ("length", "format", "banned_terms") if getattr(self, name) is not None]


class RlhfOptions(TrainingOptions):
    """Online RL (GRPO) of the policy adapter against the trained reward model's dimensions plus rule rewards (TRL GRPOTrainer)."""

    kind: ClassVar[str] = "rlhf"
    produces: ClassVar[tuple[str, ...]] = ("adapter", "tokenizer")

    policy: str | None = input_field(
        "adapter",
        "Stage whose adapter keeps training (default: the latest earlier stage producing one, usually sft); "
        "`base`: a fresh adapter on the base model.",
        special=("base",),
    )
    reward_model: str | None = input_field(
        "reward_model",
        "Reward stage whose dimensions are the rewards (default: the latest earlier one); `none`: rule rewards only.",
        special=("none",),
    )
    dataset: str = dataset_field(
        PROMPT_FORMATS,
        "Prompts: a chat dataset (each conversation up to its last answer), instruction, or the prompts "
        "of a pairs/ratings/tiers dataset (each distinct prompt once).",
    )
    weights: dict[str, float] | None = dimension_field(
        "Weight of each reward dimension, e.g. {safety: 2, accuracy: 1} (default: the weights the reward model was trained "
        "with); dimensions left out weigh 0 and are still logged. Normalised to sum 1, so the model's part is a weighted mean."
    )
    rules: RuleRewards = Field(default_factory=RuleRewards, description="Rule rewards: length, format, banned_terms.")
    beta: float = Field(
        0.04,
        ge=0,
        description="KL coefficient to the reference (the starting adapter, frozen); 0 drops the "
        "reference: faster, but nothing holds the policy near what it was.",
    )
    num_generations: int = Field(4, ge=2, description="Answers sampled per prompt; GRPO compares them with each other.")
    max_completion_length: int = Field(128, gt=0, description="Longest answer sampled, in tokens.")
    max_prompt_length: int = Field(
        512, gt=0, description="Longest prompt in tokens (chat template included); longer ones are left out (counted)."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="Divide advantages by the reward's standard deviation in each prompt's group, in the batch, or not at all.",
    )
    batch_size: int = Field(
        8,
        ge=1,
        description="Answers per device per micro-batch; batch_size x gradient_accumulation must be a "
        "multiple of num_generations (whole prompt groups).",
    )
    learning_rate: float = Field(
        2e-5, gt=0, description="Peak learning rate (RL on a LoRA adapter wants far less than SFT)."
    )
    logging_steps: int = Field(
        1, ge=1, description="Log metrics (rewards per dimension, KL, answer length) every this many steps."
    )

    def sequence_length(self) -> int:
        """Longest sequence trained on: prompt + answer."""
        return self.max_prompt_length + self.max_completion_length

    def adapters_on_base(self) -> int:
        """The policy adapter, plus its frozen copy as the KL reference when beta > 0 and the policy starts from an adapter."""
        return 2 if self.beta > 0 and self.policy != "base" else 1

    def models_in_memory(self) -> int:
        """The policy's base model, and the reward model's unless rules alone reward."""
        return 1 if self.reward_model == "none" else 2

    def check(self) -> list[tuple[str, str]]:
        per_step = self.batch_size * self.gradient_accumulation
        if per_step % self.num_generations:
            return [
                (
                    "num_generations",
                    f"batch_size x gradient_accumulation = {per_step} answers per step is not a multiple of "
                    f"num_generations ({self.num_generations}); GRPO needs whole prompt groups: "
                    "change batch_size, gradient_accumulation or num_generations",
                )
            ]
        return []

    def check_in_recipe(self, recipe: Recipe) -> list[tuple[str, str]]:
        """Rewards exist; the global batch holds whole groups; rule names are free (the banned-term file: the stage's check)."""
        problems = []
        if self.reward_model == "none" and not self.rules.given():
            problems.append(
                (
                    "rules",
                    "reward_model is none and no rule is set, so nothing rewards the answers; name a reward "
                    "stage in reward_model or set rules (length, format, banned_terms)",
                )
            )
        total = recipe.distributed.global_batch_size
        if total is not None and total % self.num_generations:
            problems.append(
                (
                    "num_generations",
                    f"distributed.global_batch_size ({total}) is not a multiple of num_generations "
                    f"({self.num_generations}); GRPO needs whole prompt groups in each step",
                )
            )
        clashes = [d.name for d in reward_dimensions(recipe) if d.name in {f"rule_{r}" for r in self.rules.given()}]
        problems += [
            ("rules", f"reward dimension {name!r} has the name of a rule reward; rename the dimension")
            for name in clashes
        ]
        return problems
