"""Options of the `debias` stage (the method: `finetune/stages/debias.py`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator

from finetune.recipe.options import TrainingOptions, dataset_field, input_field

if TYPE_CHECKING:
    from finetune.recipe.schema import Recipe

DEBIAS_FORMATS = ("chat", "instruction", "text")


class DebiasOptions(TrainingOptions):
    """LoRA training on the task with an adversary that predicts a protected attribute from the model's output
    distribution or hidden states (adversarial debiasing: gradient reversal or a confusion loss); the result is
    a normal adapter."""

    kind: ClassVar[str] = "debias"
    produces: ClassVar[tuple[str, ...]] = ("adapter", "tokenizer")
    optional_inputs: ClassVar[tuple[str, ...]] = ("policy",)

    policy: str | None = input_field(
        "adapter",
        "Stage whose adapter keeps training (default: the latest earlier stage producing one, e.g. sft; "
        "none or `base`: a fresh adapter on the base model).",
        special=("base",),
    )
    dataset: str = dataset_field(DEBIAS_FORMATS, "Task data (a chat, instruction or text dataset in `data`).")
    attribute_field: str | None = Field(
        None,
        description="A record field holding the protected attribute (any values; records without it train the "
        "task only).",
    )
    attribute_terms: dict[str, list[str]] | None = Field(
        None,
        description="The attribute derived from each record's text: label -> its terms (a record naming terms of "
        "exactly one label gets it). Default when neither this nor attribute_field is set: the two sides of "
        "data.augment's pairs.",
    )
    objective: Literal["confusion", "reversal"] = Field(
        "confusion",
        description="How the adapter hides the attribute. confusion: it is trained to make the adversary's "
        "prediction uniform (Alvi et al. 2018); reversal: the adversary's loss reaches it through a "
        "gradient-reversal layer (Ganin & Lempitsky 2015), which fools the adversary at a much larger cost "
        "to the task.",
    )
    adversary_weight: float = Field(
        1.0,
        ge=0,
        description="λ: how hard the adapter is pushed to hide the attribute (the confusion loss's weight, or "
        "the gradient reversal's factor; 0: plain SFT with the same loop, a baseline). It ramps up from 0 "
        "over training (2 / (1 + exp(-10 p)) - 1, p the share of steps done).",
    )
    adversary_hidden: int = Field(
        0, ge=0, description="Hidden units of the adversary (0: a linear classifier; else one hidden layer)."
    )
    adversary_lr: float = Field(
        1e-2,
        gt=0,
        description="Learning rate of the adversary head: a fresh head that must keep up with the adapter, so "
        "far above a LoRA's learning rate (at the stage's 5e-4, ten debias steps on SmolLM2 left the task loss "
        "as plain SFT's to four decimals: the adversary never pushed).",
    )
    reads: Literal["output", "hidden"] = Field(
        "output",
        description="What the adversary reads, averaged over the record. output: the model's next-token "
        "distribution at each position (the last hidden state through the LM head), without the tokens of the "
        "attribute's own terms: what the model says, so hiding the attribute there removes answers that depend "
        "on it (Zhang et al. 2018's adversary reads the prediction). hidden: the hidden state at `layer`: hides "
        "the attribute from that representation, which on the planted test left most of the association.",
    )
    layer: int = Field(-1, description="With reads: hidden, which hidden state (-1: the last layer).")
    pool: Literal["answer", "all"] = Field(
        "answer",
        description="Average over the positions that predict (output) or are (hidden) the learned answer "
        "tokens, or over every position.",
    )
    seq_len: int = Field(512, gt=0, description="Tokens per sequence; longer records are truncated.")
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="assistant: learn only assistant turns; all: every token."
    )
    suite: str | None = Field(
        None,
        description="A suite with implicit-bias probes, measured before and after training (logged, not gated).",
        json_schema_extra={"is_path": True},
    )
    probe_records: int = Field(
        512, ge=10, description="Labelled records used for the before/after leakage probe and task loss."
    )

    @field_validator("attribute_terms")
    @classmethod
    def _labels(cls, value: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        if value is None:
            return value
        if len(value) < 2:
            raise ValueError("give at least two labels, each with its terms (e.g. {male: [he, 男], female: [she, 女]})")
        empty = [label for label, terms in value.items() if not terms or any(not t.strip() for t in terms)]
        if empty:
            raise ValueError(f"label(s) {', '.join(empty)} have no terms or an empty term")
        return value

    def sequence_length(self) -> int:
        return self.seq_len

    def check(self) -> list[tuple[str, str]]:
        if self.attribute_field and self.attribute_terms:
            return [("attribute_terms", "set either attribute_field or attribute_terms, not both")]
        return []

    def check_in_recipe(self, recipe: Recipe) -> list[tuple[str, str]]:
        if not self.attribute_field and not self.attribute_terms and recipe.data.augment is None:
            return [
                (
                    "attribute_field",
                    "the adversary needs the protected attribute: set attribute_field (a record field), "
                    "attribute_terms (label -> terms), or data.augment (its pairs' two sides)",
                )
            ]
        return []
