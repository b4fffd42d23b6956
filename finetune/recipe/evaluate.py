"""Options of the `evaluate` stage (the method: `finetune/stages/evaluate.py`), with its gates.

`wenmai eval` takes the same options (`finetune.evaluation.runner.EvalSpec` is built from them).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from finetune.recipe.options import StageOptions, input_field

MODEL_KINDS = ["model", "adapter"]


class Gates(BaseModel):
    """Thresholds; each one set is checked, an unset one is not."""

    model_config = ConfigDict(extra="forbid")

    mc_max_drop: float | None = Field(
        None,
        ge=0,
        description="Overall multiple-choice accuracy may fall at most this many points (0-100) below the baseline.",
    )
    mc_subject_max_drop: float | None = Field(
        None,
        ge=0,
        description="Each subject's accuracy may fall at most this many points below the baseline (noisy on small subjects).",
    )
    mc_min_accuracy: float | None = Field(
        None, ge=0, le=100, description="Overall multiple-choice accuracy (percent) at least."
    )
    reward_min: dict[str, float] = Field(
        default_factory=dict,
        description="Mean reward score of the suite's replies at least, per dimension (or `total`).",
    )
    rules_min_pass_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Share of suite probes passing every rule check (language, banned terms, ...) at least.",
    )
    reward_max_drop: float | None = Field(
        None,
        ge=0,
        description="Each reward dimension's mean score (and the total) may fall at most this much below the "
        "baseline's, on the same suite judged by the same reward model (a round against its parent).",
    )
    bias_max_gap: float | None = Field(
        None, ge=0, description="Largest reward-score gap between the groups of any bias probe at most."
    )
    bias_max_reference_gap: float | None = Field(
        None,
        ge=0,
        description="Largest gap in a bias probe's reference-answer log-likelihood (per token) across groups at most.",
    )

    bias_max_effect: dict[str, float] = Field(
        default_factory=dict,
        description="Per category (a bias probe's `axis`): the largest absolute implicit-bias score at most — "
        "association effect size d (-2..2), decision spread (0..1), BBQ bias scores (-1..1).",
    )

    @field_validator("bias_max_effect")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        negative = [k for k, v in value.items() if v < 0]
        if negative:
            raise ValueError(f"a largest effect is 0 or more; negative for {', '.join(negative)}")
        return value

    def needs_baseline(self) -> bool:
        """Drops are measured against a baseline checkpoint."""
        return self.mc_max_drop is not None or self.mc_subject_max_drop is not None or self.reward_max_drop is not None

    def needs_mc(self) -> bool:
        """Some gate reads multiple-choice accuracy."""
        return self.needs_baseline() or self.mc_min_accuracy is not None

    def needs_suite(self) -> bool:
        """Some gate reads the alignment suite's results."""
        return (
            bool(self.reward_min)
            or bool(self.bias_max_effect)
            or any(
                v is not None
                for v in (
                    self.rules_min_pass_rate,
                    self.bias_max_gap,
                    self.bias_max_reference_gap,
                    self.reward_max_drop,
                )
            )
        )

    def needs_reward(self) -> bool:
        """Some gate reads reward-model scores."""
        return bool(self.reward_min) or self.bias_max_gap is not None or self.reward_max_drop is not None


class EvaluateOptions(StageOptions):
    """Evaluate a model: multiple-choice tests (CMMLU-style CSV folders) and a value-alignment suite; gate the stages after it."""

    kind: ClassVar[str] = "evaluate"
    produces: ClassVar[tuple[str, ...]] = ()
    optional_inputs: ClassVar[tuple[str, ...]] = ("model", "reward_model")

    model: str | None = input_field(
        MODEL_KINDS,
        "Stage whose model or adapter is evaluated, or `base` (default: the latest earlier stage with one, else base).",
        special=("base",),
    )
    baseline: str = input_field(
        MODEL_KINDS,
        "What the model is compared with (accuracy drops, before/after samples): `base`, an earlier stage, or `none`.",
        special=("base", "none"),
        default="base",
    )
    mc: str | None = Field(
        None,
        description="Multiple-choice folder: test/<subject>.csv and optional dev/<subject>.csv "
        "(header ,Question,A,B,C,D,Answer).",
        json_schema_extra={"is_path": True},
    )
    shots: int = Field(0, ge=0, le=10, description="Few-shot examples per question, taken from dev/ (0: zero-shot).")
    mc_limit: int | None = Field(
        None, gt=0, description="Use only the first N questions of each subject (a stated subsample)."
    )
    mc_method: Literal["loglik", "generate"] = Field(
        "loglik",
        description="loglik: the answer letter with the highest log-likelihood; generate: the first letter of a greedy reply.",
    )
    suite: str | None = Field(
        None, description="Value-alignment suite (YAML or JSONL of probes).", json_schema_extra={"is_path": True}
    )
    suite_limit: int | None = Field(
        None, gt=0, description="Use only the first N probes of the suite (bias probes are kept)."
    )
    max_new_tokens: int | None = Field(
        None, gt=0, description="Reply length bound for the suite (default: the suite's `max_new_tokens`)."
    )
    reward_model: str | None = input_field(
        "reward_model",
        "Reward stage that scores the suite's replies per dimension "
        "(default: the latest earlier one; none: reward checks are skipped).",
    )
    judge: str | None = Field(
        None,
        description="A reward model from another run (a run folder, its reward stage folder or reward_model folder) "
        "that scores the suite instead of this run's reward stage: a round is judged by its parent's reward model, "
        "not by the one it just retrained.",
        json_schema_extra={"is_path": True},
    )
    batch_size: int = Field(8, ge=1, description="Prompts per forward pass.")
    max_length: int = Field(
        2048, ge=16, description="Longest prompt in tokens; longer ones lose their earliest tokens (counted)."
    )
    gates: Gates = Field(
        default_factory=Gates,
        description="Thresholds; a failing one stops the pipeline (wenmai run --force overrides).",
    )

    def sequence_length(self) -> int:
        return self.max_length

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not self.mc and not self.suite:
            problems.append(
                (
                    "mc",
                    "an evaluate stage needs `mc:` (a multiple-choice folder), `suite:` (an alignment suite), or both",
                )
            )
        if self.gates.needs_mc() and not self.mc:
            problems.append(("gates", "multiple-choice gates (mc_*) need `mc:`"))
        if self.gates.needs_baseline() and self.baseline == "none":
            problems.append(
                (
                    "baseline",
                    "mc_max_drop / mc_subject_max_drop / reward_max_drop compare with a baseline; "
                    "set `baseline:` to base or a stage",
                )
            )
        if self.gates.needs_suite() and not self.suite:
            problems.append(("gates", "suite gates (reward_min, rules_min_pass_rate, bias_*) need `suite:`"))
        return problems
