"""Stage `kto`: preference optimisation from unpaired good/bad answers with TRL's KTOTrainer.

KTO needs no pairs, only answers labelled desirable or undesirable; Wenmai derives the labels from the
same `pairs` / `ratings` / `tiers` data as `dpo` (`finetune/preference.py`, `unpaired_rows`): an
answer that only ever wins its comparisons is desirable, one that only ever loses is undesirable, and
one that does both (a middle tier, a mid-rated answer) is left out and counted.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from finetune.stages.base import StageContext, StageResult
from finetune.stages.dpo import PreferenceOptions, unknown_choice


class Config(PreferenceOptions):
    """Preference optimisation from answers labelled good or bad, derived from pairs, tiers or ratings (TRL KTOTrainer)."""

    kind: ClassVar[str] = "kto"

    loss_type: str = Field("kto", description="TRL KTO loss: kto, or apo_zero_unpaired (checked against the installed TRL).")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of the desirable answers' loss (raise it when they are fewer).")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of the undesirable answers' loss.")
    batch_size: int = Field(4, ge=2, description="Answers per device per micro-batch; at least 2: KTO estimates its KL "
                                                 "term from the other answers of the micro-batch.")
    precompute_ref_log_probs: bool | Literal["auto"] = Field(
        "auto", description="Compute the reference log-probs once before training (auto: when training sees every answer).",
    )

    def check(self) -> list[tuple[str, str]]:
        from finetune.trl_choices import loss_types

        problems = super().check()
        known = loss_types("kto")
        if self.loss_type not in known:
            problems.append(("loss_type", unknown_choice(self.loss_type, known, "KTO loss")))
        return problems


def run(ctx: StageContext) -> StageResult:
    """Train the policy adapter on desirable/undesirable answers and save it into the stage folder."""
    from finetune.preference import train_and_save

    return train_and_save(ctx, "kto")
