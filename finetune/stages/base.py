"""What every stage shares: its config base class, the shared training options, and its context."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune.speed import SpeedOptions

if TYPE_CHECKING:
    from finetune.recipe import Recipe
    from finetune.run_dir import RunDir


def input_field(output: str | list[str], description: str, special: tuple[str, ...] = (), default: str | None = None) -> Any:
    """A field naming an earlier stage whose `output` (adapter, reward_model, ...; or one of several) this
    stage reads; `special` values (e.g. `base`) name no stage and are left to the stage to interpret."""
    extra: dict[str, Any] = {"input": output}
    if special:
        extra["special"] = list(special)
    return Field(default, description=description, json_schema_extra=extra)


def dataset_field(formats: tuple[str, ...], description: str, required: bool = True) -> Any:
    """A field naming a dataset of the recipe's `data` section, in one of `formats`."""
    extra = {"dataset": list(formats)}
    return Field(... if required else None, description=description, json_schema_extra=extra)


def dimension_field(description: str, default: Any = None) -> Any:
    """A field naming reward dimensions (a name, a list, or a mapping keyed by name) of the recipe's `reward` section."""
    return Field(default, description=description, json_schema_extra={"dimensions": True})


class StageConfig(BaseModel):
    """Options every stage has."""

    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str]
    produces: ClassVar[tuple[str, ...]] = ()  # output kinds listed in this stage's status.json

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Unique stage name and folder in the run folder (default: the kind).",
    )

    @property
    def stage_name(self) -> str:
        return self.name or self.kind

    def adapters_on_base(self) -> int:
        """LoRA adapters this stage keeps on one base model at once (2 when a reference is a frozen adapter copy).

        ZeRO-3 and FSDP shard weights once, at the start; a stage that switches between adapters cannot use them.
        """
        return 1


class TrainingOptions(StageConfig):
    """Training options shared by every trainer stage; one builder turns them into TRL arguments."""

    supports_padding_free: ClassVar[bool] = False  # the stage's trainer can run padding-free batches (speed.padding_free)

    max_steps: int = Field(-1, description="Stop after this many optimiser steps; -1 trains for `epochs`.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training set when `max_steps` is -1.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (LoRA usually 1e-4 .. 3e-4).")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup: float = Field(0.03, ge=0, description="Warmup: a fraction of all steps if below 1, else a step count.")
    batch_size: int = Field(4, ge=1, description="Sequences per device per micro-batch.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    eval_batch_size: int | None = Field(None, ge=1, description="Batch size for evaluation (default: batch_size).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: str = Field("adamw_torch", description="Optimiser name as transformers knows it (adamw_torch, adamw_8bit, ...).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision; auto is bf16 on a GPU that supports it, else fp32."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute activations to save memory (true: every layer); auto: sft and reward leave it to "
        "speed.checkpointing, other stages turn it on with CUDA and off on CPU."
    )
    seed: int = Field(42, description="Seed for weights init, dropout and data order.")
    logging_steps: int = Field(10, ge=1, description="Log metrics every this many steps.")
    eval_steps: int = Field(50, ge=1, description="Evaluate every this many steps (when the stage has an eval set).")
    save_steps: int = Field(100, ge=1, description="Save a resumable checkpoint every this many steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted.")
    speed: SpeedOptions = Field(default_factory=SpeedOptions, description="Speed paths; `auto` picks for this machine.")


@dataclass
class StageContext:
    """Everything a stage's `run` receives."""

    recipe: Recipe
    config: Any  # the stage's own config (a StageConfig subclass)
    run_dir: RunDir
    inputs: dict[str, dict[str, str]]  # input field -> the producing stage's outputs (absolute paths)
    resume_from: Path | None = None  # last checkpoint of an interrupted attempt
    input_stages: dict[str, str] = field(default_factory=dict)  # input field -> the producing stage's name
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stage_dir(self) -> Path:
        return self.run_dir.stage_dir(self.config.stage_name)


@dataclass
class StageResult:
    """What a stage produced: typed outputs (paths relative to its folder) and summary figures."""

    outputs: dict[str, str]
    summary: dict[str, Any] = field(default_factory=dict)
