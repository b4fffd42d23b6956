"""Options of the `sft` stage (the method: `finetune/stages/sft.py`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from finetune.recipe.options import SpeedPlannedOptions, dataset_field, held_out_conflict

SFT_FORMATS = ("chat", "instruction", "text")


class SftOptions(SpeedPlannedOptions):
    """Supervised fine-tuning of a LoRA adapter on chat, instruction or text data (TRL SFTTrainer + PEFT)."""

    kind: ClassVar[str] = "sft"
    produces: ClassVar[tuple[str, ...]] = ("adapter", "tokenizer")
    supports_padding_free: ClassVar[bool] = True

    dataset: str = dataset_field(SFT_FORMATS, "Training dataset (a name in `data`).")
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

    def check(self) -> list[tuple[str, str]]:
        return held_out_conflict(self.eval_dataset, self.eval_fraction) + super().check()
