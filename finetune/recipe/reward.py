"""Options of the `reward` stage (the method: `finetune/stages/reward.py`)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from finetune.recipe.options import SpeedPlannedOptions, dataset_field, held_out_conflict

REWARD_FORMATS = ("pairs", "ratings", "tiers")


class RewardOptions(SpeedPlannedOptions):
    """Reward model from preference pairs, tiers or 1..5 ratings: LoRA backbone + a head per reward dimension (TRL RewardTrainer)."""

    kind: ClassVar[str] = "reward"
    produces: ClassVar[tuple[str, ...]] = ("reward_model",)
    sequences_per_example: ClassVar[int] = 2  # a pair is two sequences (memory estimates, micro-batch tuning)

    dataset: str = dataset_field(
        REWARD_FORMATS, "Preference data: a `pairs`, `ratings` or `tiers` dataset (a name in `data`)."
    )
    eval_dataset: str | None = dataset_field(
        REWARD_FORMATS, "Held-out preference data for pairwise accuracy (a name in `data`).", required=False
    )
    eval_fraction: float | None = Field(
        None,
        ge=0,
        lt=0.5,
        description="Hold out this share of the prompts (with all their pairs) for pairwise accuracy; "
        "default 0.1 unless eval_dataset is set; 0 turns evaluation off.",
    )
    batch_size: int = Field(4, ge=1, description="Pairs per device per micro-batch (each pair is two sequences).")
    seq_len: int = Field(
        512,
        gt=0,
        description="Tokens per prompt + response; longer ones lose their beginning (counted in the summary).",
    )
    margin_scale: float = Field(
        0.0,
        ge=0,
        description="Margin term: loss -log σ(r_chosen - r_rejected - margin_scale × margin), where margin is the score "
        "difference (ratings), tier distance (tiers) or the pair's `margin`; 0 is plain Bradley-Terry.",
    )
    center_rewards_coefficient: float | None = Field(
        None,
        ge=0,
        description="Reward centring: adds this × (r_chosen + r_rejected)² so rewards stay near 0 (TRL suggests 0.01).",
    )

    def sequence_length(self) -> int:
        return self.seq_len

    def check(self) -> list[tuple[str, str]]:
        return held_out_conflict(self.eval_dataset, self.eval_fraction) + super().check()
