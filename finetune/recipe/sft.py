"""Options of the `sft` stage (the method: `finetune/stages/sft.py`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from finetune.recipe.options import SpeedPlannedOptions, dataset_field, held_out_conflict

SFT_FORMATS = ("chat", "instruction", "text")


class DataMix(BaseModel):
    """How `datasets` are mixed: how many records are drawn, each dataset's share fixed by its weight."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["first_exhausted", "all_exhausted"] = Field(
        "first_exhausted",
        description="first_exhausted: draw as many records as the ratios allow without repeating any; "
        "all_exhausted: draw until every record was used once, repeating records of the smaller shares.",
    )
    samples: int | None = Field(
        None, gt=0, description="Draw exactly this many records instead (records repeat when needed)."
    )
    seed: int | None = Field(None, description="Seed of the draw (default: the stage's seed).")


class SftOptions(SpeedPlannedOptions):
    """Supervised fine-tuning of a LoRA adapter on chat, instruction or text data (TRL SFTTrainer + PEFT)."""

    kind: ClassVar[str] = "sft"
    produces: ClassVar[tuple[str, ...]] = ("adapter", "tokenizer")
    supports_padding_free: ClassVar[bool] = True

    dataset: str | None = dataset_field(
        SFT_FORMATS, "Training dataset (a name in `data`); or give `datasets` to mix several.", required=False
    )
    datasets: dict[str, float] | None = dataset_field(
        SFT_FORMATS,
        "Several training datasets mixed by weight, e.g. {museum_qa: 0.7, poetry: 0.3} (weights are normalised); "
        "the drawn counts are in the stage's data card.",
        required=False,
    )
    mix: DataMix = Field(default_factory=DataMix, description="How `datasets` are mixed.")
    token_cache: str | None = Field(
        "~/.cache/wenmai/tokenized",
        description="Folder of tokenised datasets: a later run with the same data file, tokenizer, chat template "
        "and data policy reads its rows from here instead of tokenizing again; null turns the cache off.",
        json_schema_extra={"is_path": True},
    )
    eval_dataset: str | None = dataset_field(
        SFT_FORMATS, "Held-out dataset for eval loss (a name in `data`).", required=False
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=0.5, description="Hold out this share of `dataset` for eval loss instead."
    )
    seq_len: int = Field(
        1024, gt=0, description="Tokens per sequence; longer records are truncated (counted in the summary)."
    )
    packing: bool = Field(False, description="Pack several records into each sequence (TRL best-fit packing).")
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="assistant: learn only assistant turns (and their end token); all: every token."
    )

    def sequence_length(self) -> int:
        return self.seq_len

    def packs(self) -> bool:
        return self.packing

    @model_validator(mode="after")
    def _one_training_set(self) -> SftOptions:
        if self.datasets is not None:
            if not self.datasets or any(w <= 0 for w in self.datasets.values()):
                raise ValueError("`datasets` needs at least one dataset, each with a weight above 0")
            if self.dataset is not None and self.dataset not in self.datasets:
                raise ValueError(f"`dataset` {self.dataset!r} is not one of `datasets`; give one of them, not both")
            self.dataset = self.dataset or next(iter(self.datasets))  # the first: probes and the report name it
        # no dataset at all: only a federated server's recipe may say so (each client names its own); the
        # recipe-level check (`finetune.recipe.checks.problems`) refuses it everywhere else
        return self

    def mixture(self) -> dict[str, float] | None:
        """The datasets mixed and their normalised weights; None for a single dataset."""
        if not self.datasets or len(self.datasets) < 2:
            return None
        total = sum(self.datasets.values())
        return {name: weight / total for name, weight in self.datasets.items()}

    def check(self) -> list[tuple[str, str]]:
        return held_out_conflict(self.eval_dataset, self.eval_fraction) + super().check()
