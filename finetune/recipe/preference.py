"""Options of the preference stages `dpo`, `kto` and `orpo` (the method: `finetune/stages/preference.py`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from finetune.recipe.options import TrainingOptions, dataset_field, dimension_field, held_out_conflict, input_field

PREFERENCE_FORMATS = ("pairs", "ratings", "tiers")


class PreferenceOptions(TrainingOptions):
    """Options every preference stage (dpo, kto, orpo) has."""

    produces: ClassVar[tuple[str, ...]] = ("adapter", "tokenizer")
    sequences_per_example: ClassVar[int] = 2  # chosen and rejected (memory estimate)
    uses_reference: ClassVar[bool] = True

    policy: str | None = input_field(
        "adapter",
        "Stage whose adapter keeps training (default: the latest earlier stage producing one, usually sft); "
        "`base`: a fresh adapter on the base model.",
        special=("base",),
    )
    dataset: str = dataset_field(
        PREFERENCE_FORMATS, "Preference data: a `pairs`, `ratings` or `tiers` dataset (a name in `data`)."
    )
    eval_dataset: str | None = dataset_field(
        PREFERENCE_FORMATS, "Held-out preference data for reward margins and accuracy.", required=False
    )
    eval_fraction: float | None = Field(
        None,
        ge=0,
        lt=0.5,
        description="Hold out this share of the prompts (with all their pairs) for held-out margins; default 0.1 unless "
        "eval_dataset is set; 0 turns evaluation off.",
    )
    pairs_on: str = dimension_field(
        "What a pair judges: `total` (ratings compared on the recipe's weighted total; every pairs/tiers record) or one "
        "reward dimension (ratings compared on it; pairs/tiers records judging another dimension are left out).",
        default="total",
    )
    seq_len: int = Field(
        512,
        gt=0,
        description="Tokens per prompt + response; longer responses lose their end, pairs "
        "whose prompt alone fills it are left out (counted).",
    )
    batch_size: int = Field(4, ge=1, description="Pairs per device per micro-batch (each pair is two sequences).")
    learning_rate: float = Field(
        5e-5,
        gt=0,
        description="Peak learning rate; preference tuning of a LoRA adapter "
        "wants less than SFT (TRL's 1e-6 default is for full fine-tuning).",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the pull towards the reference: higher stays closer to it "
        "(for ipo it is τ; for orpo the weight λ of the odds-ratio term).",
    )

    def sequence_length(self) -> int:
        return self.seq_len

    def check(self) -> list[tuple[str, str]]:
        return held_out_conflict(self.eval_dataset, self.eval_fraction)

    def adapters_on_base(self) -> int:
        """The policy adapter, plus its frozen copy as the reference when the policy starts from an adapter."""
        return 2 if self.uses_reference and self.policy != "base" else 1

    def precompute_setting(self) -> bool | Literal["auto"]:
        """The stage's `precompute_ref_log_probs` (a stage without a reference precomputes nothing)."""
        return False

    def precompute(self, train_examples: int, examples_per_step: int) -> bool:
        """Whether the reference log-probs are precomputed (auto: when training sees every example at least once)."""
        setting = self.precompute_setting()
        if setting == "auto":
            return self.max_steps == -1 or self.max_steps * examples_per_step >= train_examples
        return bool(setting)


class DpoOptions(PreferenceOptions):
    """Preference optimisation (DPO and its loss variants) of the policy adapter against a frozen reference (TRL DPOTrainer)."""

    kind: ClassVar[str] = "dpo"

    loss_type: str | list[str] = Field(
        "sigmoid",
        description="TRL DPO loss, or a list mixed with `loss_weights`: sigmoid (DPO), ipo, hinge, robust, exo_pair, "
        "nca_pair, bco_pair, sppo_hard, aot, apo_zero, apo_down, discopop, sft, ... (checked against the installed TRL).",
    )
    loss_weights: list[float] | None = Field(None, description="Weight of each loss in `loss_type` (default: 1 each).")
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="robust: share of labels assumed flipped; exo_pair: its ε (needs > 0, 1e-3 typical).",
    )
    precompute_ref_log_probs: bool | Literal["auto"] = Field(
        "auto",
        description="Compute the reference log-probs of every pair once before training instead of in every step (fast "
        "path); auto: on when training passes over every pair at least once, off for a few steps on a large set, "
        "where that pass would cost more than it saves.",
    )
    precompute_batch_size: int | None = Field(
        None, ge=1, description="Pairs per forward pass when precomputing (default: batch_size)."
    )
    liger_kernel: bool = Field(
        False,
        description="Liger's Triton kernels for the model's layers (RMSNorm, RoPE, SwiGLU); needs CUDA and "
        "liger-kernel (the `gpu` extra).",
    )

    def losses(self) -> list[str]:
        """`loss_type` as a list."""
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    def precompute_setting(self) -> bool | Literal["auto"]:
        return self.precompute_ref_log_probs

    def check(self) -> list[tuple[str, str]]:
        problems = super().check()
        names = self.losses()
        if not names:
            problems.append(("loss_type", "give at least one loss, e.g. sigmoid"))
        if self.loss_weights is not None and len(self.loss_weights) != len(names):
            problems.append(
                (
                    "loss_weights",
                    f"{len(self.loss_weights)} weights for {len(names)} losses in loss_type; give one weight per loss",
                )
            )
        if "exo_pair" in names and self.label_smoothing == 0:
            problems.append(("label_smoothing", "exo_pair needs label_smoothing > 0 (its ε; the EXO paper uses 1e-3)"))
        return problems


class KtoOptions(PreferenceOptions):
    """Preference optimisation from answers labelled good or bad, derived from pairs, tiers or ratings (TRL KTOTrainer)."""

    kind: ClassVar[str] = "kto"

    loss_type: str = Field(
        "kto", description="TRL KTO loss: kto, or apo_zero_unpaired (checked against the installed TRL)."
    )
    desirable_weight: float = Field(
        1.0, gt=0, description="Weight of the desirable answers' loss (raise it when they are fewer)."
    )
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of the undesirable answers' loss.")
    batch_size: int = Field(
        4,
        ge=2,
        description="Answers per device per micro-batch; at least 2: KTO estimates its KL "
        "term from the other answers of the micro-batch.",
    )
    precompute_ref_log_probs: bool | Literal["auto"] = Field(
        "auto",
        description="Compute the reference log-probs once before training (auto: when training sees every answer).",
    )

    def losses(self) -> list[str]:
        """`loss_type` as a list."""
        return [self.loss_type]

    def precompute_setting(self) -> bool | Literal["auto"]:
        return self.precompute_ref_log_probs


class OrpoOptions(PreferenceOptions):
    """Odds-ratio preference optimisation: SFT on the chosen answers plus a preference term, no reference model (TRL ORPOTrainer)."""

    kind: ClassVar[str] = "orpo"
    uses_reference: ClassVar[bool] = False
