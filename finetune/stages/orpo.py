"""Stage `orpo`: odds-ratio preference optimisation with TRL's ORPOTrainer (in `trl.experimental`).

ORPO adds an odds-ratio term to the SFT loss on the chosen answers, so it needs no reference model (one
adapter on the base) and can start from the base model (`policy: base`) instead of an SFT adapter.
"""

from __future__ import annotations

from typing import ClassVar

from finetune.stages.base import StageContext, StageResult
from finetune.stages.dpo import PreferenceOptions


class Config(PreferenceOptions):
    """Odds-ratio preference optimisation: SFT on the chosen answers plus a preference term, no reference model (TRL ORPOTrainer)."""

    kind: ClassVar[str] = "orpo"
    uses_reference: ClassVar[bool] = False


def run(ctx: StageContext) -> StageResult:
    """Train the policy adapter with the ORPO loss and save it into the stage folder."""
    from finetune.preference import train_and_save

    return train_and_save(ctx, "orpo")
