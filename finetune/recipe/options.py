"""What every stage's options share: the stage interface, the field markers, the training and speed options.

`StageOptions` declares, with defaults, everything the rest of Wenmai asks of a stage's options (what it
produces, which inputs may be missing, its sequence length and memory shape, its own checks), so no caller
probes with `getattr`. Fields that name a dataset, an earlier stage or reward dimensions are made with
`dataset_field`, `input_field` and `dimension_field`; `marked_fields` lists them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

if TYPE_CHECKING:
    from finetune.recipe.schema import Recipe

Marker = Literal["dataset", "input", "dimensions", "is_path"]


def input_field(
    output: str | list[str], description: str, special: tuple[str, ...] = (), default: str | None = None
) -> Any:
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


def marked_fields(options: type[BaseModel], marker: Marker) -> Iterator[tuple[str, dict[str, Any]]]:
    """(field name, its markers) for every field of `options` made with the helper for `marker`."""
    for name, info in options.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get(marker):
            yield name, extra


class StageOptions(BaseModel):
    """Options every stage has, and the interface every stage kind's options provide (defaults here)."""

    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str]
    produces: ClassVar[tuple[str, ...]] = ()  # output kinds listed in this stage's status.json
    optional_inputs: ClassVar[tuple[str, ...]] = ()  # input fields that may find no earlier stage
    sequences_per_example: ClassVar[int] = 1  # sequences one example holds (a preference pair: 2)

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Unique stage name and folder in the run folder (default: the kind).",
    )

    @property
    def stage_name(self) -> str:
        return self.name or self.kind

    def sequence_length(self) -> int | None:
        """Longest sequence the stage runs, in tokens (memory estimates); None when it runs no model."""
        return None

    def models_in_memory(self) -> int:
        """Base models the stage holds at once (memory estimate)."""
        return 1

    def adapters_on_base(self) -> int:
        """LoRA adapters this stage keeps on one base model at once (2 when a reference is a frozen adapter copy).

        ZeRO-3 and FSDP shard weights once, at the start; a stage that switches between adapters cannot use them.
        """
        return 1

    def speed_options(self) -> SpeedOptions | None:
        """The `speed:` section of a stage that runs a speed plan; None for the others."""
        return None

    def packs(self) -> bool:
        """Whether the stage packs several records into one sequence."""
        return False

    def check(self) -> list[tuple[str, str]]:
        """Contradictions among the stage's own fields, as (field, message) pairs."""
        return []

    def check_in_recipe(self, recipe: Recipe) -> list[tuple[str, str]]:
        """Contradictions with the rest of the recipe (no files, no machine), as (field, message) pairs."""
        return []


class TrainingOptions(StageOptions):
    """Training options shared by every trainer stage; one builder turns them into TRL arguments."""

    # the stage's trainer can run padding-free batches (speed.padding_free)
    supports_padding_free: ClassVar[bool] = False

    max_steps: int = Field(
        -1, ge=-1, le=100_000_000, description="Stop after this many optimiser steps; -1 trains for `epochs`."
    )
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
    optimizer: str = Field(
        "adamw_torch", description="Optimiser name as transformers knows it (adamw_torch, adamw_8bit, ...)."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision; auto is bf16 on a GPU that supports it, else fp32."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations to save memory (true: every layer); auto: sft and reward leave it to "
        "speed.checkpointing, other stages turn it on with CUDA and off on CPU.",
    )
    seed: int = Field(42, description="Seed for weights init, dropout and data order.")
    logging_steps: int = Field(10, ge=1, description="Log metrics every this many steps.")
    eval_steps: int = Field(50, ge=1, description="Evaluate every this many steps (when the stage has an eval set).")
    save_steps: int = Field(100, ge=1, description="Save a resumable checkpoint every this many steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted.")

    @field_validator("max_steps")
    @classmethod
    def _some_steps(cls, steps: int) -> int:
        if steps == 0:
            raise ValueError("0 steps trains nothing; give a step count of 1 or more, or -1 to train for `epochs`")
        return steps

    @model_validator(mode="before")
    @classmethod
    def _no_speed_plan(cls, data: Any) -> Any:
        """A `speed:` section on a stage without a speed plan is refused at `<stage>.speed`, saying what to use."""
        if isinstance(data, dict) and "speed" in data and "speed" not in cls.model_fields:
            own = (
                " and use its own precompute_ref_log_probs / liger_kernel options"
                if "precompute_ref_log_probs" in cls.model_fields
                else ""
            )
            message = (
                f"the {cls.kind} stage does not run the speed options yet (they apply to sft, reward); "
                f"remove `speed:` here{own}"
            )
            error = PydanticCustomError("refused_option", "{message}", {"message": message})
            raise ValidationError.from_exception_data(
                cls.__name__, [InitErrorDetails(type=error, loc=("speed",), input=data["speed"])]
            )
        return data


class SpeedOptions(BaseModel):
    """How a trainer stage runs fast: kernels, padding, activation memory, compilation, micro-batches."""

    model_config = ConfigDict(extra="forbid")

    liger: bool | Literal["auto"] = Field(
        "auto",
        description="Liger Triton kernels for RMSNorm, RoPE and SwiGLU (through transformers' use_liger_kernel). "
        "auto: on with a CUDA GPU when liger-kernel is installed and supports the model type.",
    )
    padding_free: bool | Literal["auto"] = Field(
        "auto",
        description="Run each micro-batch as one row of its sequences, no padding, each sequence attending only to "
        "itself (position_ids). auto: on CPU (SDPA masks by position_ids); on a GPU when PyTorch's varlen flash "
        "attention or flash_attention_2 is there. Always on with packing. sft only.",
    )
    checkpointing: bool | Literal["auto", "full", "selective", "offload"] = Field(
        "auto",
        description="Activation checkpointing: false (off), full (or true) recomputes every layer, selective every "
        "`checkpoint_every`-th, offload also keeps the checkpointed inputs in host memory. auto: follows gradient_checkpointing when set; "
        "off on CPU; on a GPU the fastest choice whose memory estimate fits `memory_budget`.",
    )
    checkpoint_every: int | None = Field(
        None,
        ge=2,
        description="selective: checkpoint every this many layers (default: on a GPU the largest stride that "
        "fits the budget, else 2).",
    )
    compile: bool = Field(False, description="torch.compile the model (compiling takes minutes on CPU).")
    batch: Literal["auto", "fixed"] = Field(
        "auto",
        description="auto: on a GPU, split the global batch (batch_size x gradient_accumulation) into the micro-batch "
        "that runs fastest within `memory_budget`; the global batch and the loss are unchanged. fixed: as written.",
    )
    memory_budget: float = Field(
        0.85, gt=0, description="GPU memory the auto choices may plan for: a share of the GPU if at most 1, else GiB."
    )
    qlora_upcast: bool = Field(
        False,
        description="QLoRA: upcast norms and embeddings to fp32 as PEFT's prepare_model_for_kbit_training does; "
        "false keeps them in the compute dtype (less memory, faster).",
    )


class SpeedPlannedOptions(TrainingOptions):
    """A trainer stage that runs a speed plan (`finetune.speed`): it has a `speed:` section."""

    speed: SpeedOptions = Field(default_factory=SpeedOptions, description="Speed paths; `auto` picks for this machine.")

    def speed_options(self) -> SpeedOptions:
        return self.speed

    def check(self) -> list[tuple[str, str]]:
        return super().check() + speed_conflicts(self, self.speed)


def held_out_conflict(eval_dataset: str | None, eval_fraction: float | None) -> list[tuple[str, str]]:
    """A stage holds out evaluation data one way: a dataset of its own, or a share of its training set."""
    if eval_dataset and eval_fraction:
        return [("eval_fraction", "set either eval_dataset or eval_fraction, not both")]
    return []


def checkpointing_mode(value: bool | str) -> str:
    """A `checkpointing` value as a mode name: false is off, true is full."""
    if isinstance(value, bool):
        return "full" if value else "off"
    return value


def speed_conflicts(options: TrainingOptions, speed: SpeedOptions) -> list[tuple[str, str]]:
    """(key relative to the stage, message) for each contradiction between the speed options and the stage's."""
    found = []
    explicit = checkpointing_mode(speed.checkpointing)
    wants = options.gradient_checkpointing if "gradient_checkpointing" in options.model_fields_set else "auto"
    if wants is False and explicit in ("full", "selective", "offload"):
        found.append(("speed.checkpointing", f"is {explicit}, but gradient_checkpointing is false; remove one of them"))
    if wants is True and explicit == "off":
        found.append(("speed.checkpointing", "is false, but gradient_checkpointing is true; remove one of them"))
    if speed.checkpoint_every is not None and explicit not in ("auto", "selective"):
        found.append(("speed.checkpoint_every", f"is only used with checkpointing: selective (it is {explicit})"))
    if speed.padding_free is True and not type(options).supports_padding_free:
        found.append(("speed.padding_free", f"the {options.kind} stage has no padding-free path; use auto or false"))
    if options.packs() and speed.padding_free is False:
        found.append(
            (
                "packing",
                "packing needs padding-free batches (TRL's best-fit packing keeps sequences apart "
                "through position_ids); set speed.padding_free: auto or packing: false",
            )
        )
    if speed.compile and explicit == "offload":
        found.append(
            (
                "speed.compile",
                "torch.compile runs all saved-tensor unpack hooks at once (pytorch#148222), so "
                "offloaded checkpoints would save no memory; use checkpointing: full or compile: false",
            )
        )
    return found
