"""The recipe: its sections, and `stages:`, a list of one-key mappings `{kind: options}` over the options registry."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model, model_serializer, model_validator

from finetune.recipe.debias import DebiasOptions
from finetune.recipe.evaluate import EvaluateOptions
from finetune.recipe.federated import FederatedSection
from finetune.recipe.merge import ExportOptions, MergeOptions
from finetune.recipe.options import StageOptions
from finetune.recipe.preference import DpoOptions, KtoOptions, OrpoOptions
from finetune.recipe.reward import RewardOptions
from finetune.recipe.rlhf import RlhfOptions
from finetune.recipe.sections import (
    DEFAULT_DIMENSION,
    DataSection,
    DistributedSection,
    LoraSection,
    ModelSection,
    OutputSection,
    RewardSection,
    RoundSection,
    Section,
    TrackingSection,
)
from finetune.recipe.sft import SftOptions

OPTIONS: dict[str, type[StageOptions]] = {
    options.kind: options
    for options in (
        SftOptions,
        RewardOptions,
        DpoOptions,
        KtoOptions,
        OrpoOptions,
        RlhfOptions,
        DebiasOptions,
        EvaluateOptions,
        MergeOptions,
        ExportOptions,
    )
}
"""Stage kind -> its options class; `finetune.stages.STAGES` maps the same kinds to the methods."""


class _StageEntryBase(BaseModel):
    """One item of `stages:` — a mapping with exactly one key, the stage kind."""

    model_config = ConfigDict(extra="forbid")
    __stage_entry__: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data:
            kinds = ", ".join(OPTIONS)
            raise ValueError(f"a stage is a mapping with one key, its kind ({kinds}); e.g. `- sft: {{dataset: train}}`")
        if len(data) > 1:
            raise ValueError(
                f"a stage has exactly one kind, got {', '.join(map(str, data))}; start each stage with its own `-`"
            )
        return {k: ({} if v is None else v) for k, v in data.items()}

    @model_serializer(mode="wrap")
    def _dump_own_kind(self, handler: Any) -> Any:
        # `{kind: options}` only: the other kinds (all None) would make the dumped recipe unreadable
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @property
    def config(self) -> StageOptions:
        return next(v for v in (getattr(self, k) for k in type(self).model_fields) if v is not None)


StageEntry = create_model(
    "StageEntry",
    __base__=_StageEntryBase,
    **{
        kind: (options | None, Field(None, description=(options.__doc__ or "").strip()))
        for kind, options in OPTIONS.items()
    },
)


class Recipe(Section):
    """A Wenmai recipe."""

    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Recipe name; run folders are named after it."
    )
    model: ModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(
        default_factory=DataSection,
        description="Named datasets that stages read, and the data `policy` (a federated server's recipe has none).",
    )
    stages: list[StageEntry] = Field(..., min_length=1, description="Stages, run in order.")  # type: ignore[valid-type]
    reward: RewardSection | None = Field(
        None, description=f"Reward dimensions and their weights (default: one dimension, `{DEFAULT_DIMENSION}`)."
    )
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    output: OutputSection = Field(default_factory=OutputSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    federated: FederatedSection | None = Field(
        None, description="Federated LoRA across institutions on Flower (`wenmai federate`)."
    )
    round: RoundSection | None = Field(
        None, description="Set by `wenmai iterate`: this run is a round of a parent run."
    )
    # each value that came from `${env:...}` -> its reference (set by `finetune.recipe.secrets`)
    _env_values: dict[str, str] = PrivateAttr(default_factory=dict)

    def stage_configs(self) -> list[StageOptions]:
        return [entry.config for entry in self.stages]

    def stage(self, name: str) -> StageOptions:
        return next(c for c in self.stage_configs() if c.stage_name == name)
