"""Stage `rlhf`: online RL of the policy adapter with TRL's GRPOTrainer against the trained reward model.

Prompts come from a dataset; the policy (the adapter named by `policy:`) samples `num_generations` answers
per prompt; each dimension of the reward model of the stage named by `reward_model:` is one reward
function (weighted as the recipe says), and rule rewards (length, format, banned terms) can be added. The
KL to the reference (the policy's starting adapter, frozen) is weighted by `beta`. Saves one complete
adapter, like `dpo`. The work is in `finetune/rlhf.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from finetune.stages.base import (
    StageContext,
    StageResult,
    TrainingOptions,
    dataset_field,
    dimension_field,
    input_field,
)
from reward.rules import RuleRewards

if TYPE_CHECKING:
    from finetune.recipe import Recipe

PROMPT_FORMATS = ("chat", "instruction", "pairs", "ratings", "tiers")


class Config(TrainingOptions):
    """Online RL (GRPO) of the policy adapter against the trained reward model's dimensions plus rule rewards (TRL GRPOTrainer)."""

    kind: ClassVar[str] = "rlhf"
    produces: ClassVar[tuple[str, ...]] = ("adapter", "tokenizer")

    policy: str | None = input_field(
        "adapter", "Stage whose adapter keeps training (default: the latest earlier stage producing one, usually sft); "
        "`base`: a fresh adapter on the base model.", special=("base",))
    reward_model: str | None = input_field(
        "reward_model", "Reward stage whose dimensions are the rewards (default: the latest earlier one); `none`: rule "
        "rewards only.", special=("none",))
    dataset: str = dataset_field(
        PROMPT_FORMATS, "Prompts: a chat dataset (each conversation up to its last answer), instruction, or the prompts "
        "of a pairs/ratings/tiers dataset (each distinct prompt once).")
    weights: dict[str, float] | None = dimension_field(
        "Weight of each reward dimension, e.g. {safety: 2, accuracy: 1} (default: the weights the reward model was trained "
        "with); dimensions left out weigh 0 and are still logged. Normalised to sum 1, so the model's part is a weighted mean.")
    rules: RuleRewards = Field(default_factory=RuleRewards, description="Rule rewards: length, format, banned_terms.")
    beta: float = Field(0.04, ge=0, description="KL coefficient to the reference (the starting adapter, frozen); 0 drops the "
                                                "reference: faster, but nothing holds the policy near what it was.")
    num_generations: int = Field(4, ge=2, description="Answers sampled per prompt; GRPO compares them with each other.")
    max_completion_length: int = Field(128, gt=0, description="Longest answer sampled, in tokens.")
    max_prompt_length: int = Field(512, gt=0, description="Longest prompt in tokens (chat template included); longer ones are left out (counted).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the reward's standard deviation in each prompt's group, in the batch, or not at all.")
    batch_size: int = Field(8, ge=1, description="Answers per device per micro-batch; batch_size x gradient_accumulation must be a "
                                                 "multiple of num_generations (whole prompt groups).")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate (RL on a LoRA adapter wants far less than SFT).")
    logging_steps: int = Field(1, ge=1, description="Log metrics (rewards per dimension, KL, answer length) every this many steps.")

    @property
    def seq_len(self) -> int:
        """Longest sequence trained on: prompt + answer (memory estimate)."""
        return self.max_prompt_length + self.max_completion_length

    def adapters_on_base(self) -> int:
        """The policy adapter, plus its frozen copy as the KL reference when beta > 0 and the policy starts from an adapter."""
        return 2 if self.beta > 0 and self.policy != "base" else 1

    def models_in_memory(self) -> int:
        """Base models held at once (memory estimate): the policy's, and the reward model's unless rules alone reward."""
        return 1 if self.reward_model == "none" else 2

    def check(self) -> list[tuple[str, str]]:
        per_step = self.batch_size * self.gradient_accumulation
        if per_step % self.num_generations:
            return [("num_generations", f"batch_size x gradient_accumulation = {per_step} answers per step is not a multiple of "
                                        f"num_generations ({self.num_generations}); GRPO needs whole prompt groups: "
                                        "change batch_size, gradient_accumulation or num_generations")]
        return []

    def check_in_recipe(self, recipe: Recipe) -> list[tuple[str, str]]:
        """Rewards exist; the global batch holds whole groups; the banned-term file reads; rule names are free."""
        from finetune.errors import WenmaiError
        from finetune.recipe import reward_dimensions
        from reward.rules import read_banned_terms

        problems = []
        if self.reward_model == "none" and not self.rules.given():
            problems.append(("rules", "reward_model is none and no rule is set, so nothing rewards the answers; name a reward "
                                      "stage in reward_model or set rules (length, format, banned_terms)"))
        total = recipe.distributed.global_batch_size
        if total is not None and total % self.num_generations:
            problems.append(("num_generations", f"distributed.global_batch_size ({total}) is not a multiple of num_generations "
                                                f"({self.num_generations}); GRPO needs whole prompt groups in each step"))
        if self.rules.banned_terms is not None:
            try:
                read_banned_terms(self.rules.banned_terms.path)
            except WenmaiError as err:
                problems.append(("rules.banned_terms.path", str(err).removeprefix("banned terms: ")))
        clashes = [d.name for d in reward_dimensions(recipe) if d.name in {f"rule_{r}" for r in self.rules.given()}]
        problems += [("rules", f"reward dimension {name!r} has the name of a rule reward; rename the dimension") for name in clashes]
        return problems


def run(ctx: StageContext) -> StageResult:
    """Sample, score and update the policy adapter; save it (one complete adapter) into the stage folder."""
    from finetune.rlhf import train_and_save

    return train_and_save(ctx)
