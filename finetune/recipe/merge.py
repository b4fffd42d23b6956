"""Options of the `merge` and `export` stages (the methods: `finetune/stages/merge.py`, `finetune/stages/export.py`).

Both are gated by logit parity against the model they came from, within a `Tolerance`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune.recipe.options import StageOptions, dataset_field, input_field

PROBE_FORMATS = ("chat", "instruction", "text")
GGUFType = Literal["f32", "f16", "bf16", "q8_0"]


class Tolerance(BaseModel):
    """How far a candidate's next-token logits may drift from the reference before the gate refuses it."""

    model_config = ConfigDict(extra="forbid")

    max_abs_logit_diff: float = Field(
        ..., gt=0, description="Largest allowed |logit difference| over every probe step."
    )
    mean_kl: float = Field(
        ..., gt=0, description="Largest allowed mean KL(reference ‖ candidate) of the next-token distributions."
    )
    min_greedy_agreement: float = Field(
        ...,
        ge=0,
        le=1,
        description="Smallest allowed share of probes whose greedy continuation the candidate reproduces exactly.",
    )


class MergeOptions(StageOptions):
    """Merge an adapter into the base (reloaded unquantised in the training dtype) behind a logit-parity gate (PEFT)."""

    kind: ClassVar[str] = "merge"
    produces: ClassVar[tuple[str, ...]] = ("model",)

    adapter: str | None = input_field(
        "adapter", "Stage whose adapter is merged (default: the latest earlier stage producing one)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to merge and run the probes; auto is CUDA when there is a GPU, else CPU."
    )
    probe_dataset: str | None = dataset_field(
        PROBE_FORMATS, "Dataset the probe prompts come from (default: the first training stage's).", required=False
    )
    probes: int = Field(
        6,
        ge=0,
        le=200,
        description="Prompts taken from `probe_dataset`; four built-in bilingual ones are always added.",
    )
    max_new_tokens: int = Field(
        16, ge=1, le=512, description="Greedy tokens generated per probe and compared step by step."
    )
    tolerance: Tolerance | None = Field(
        None,
        description="Allowed drift from the unmerged adapter (default per dtype: max |logit diff| 2e-3 for float32, 0.5 for float16, 3.0 for bfloat16).",
    )


class ExportOptions(StageOptions):
    """Export a merged model: HF safetensors (+ GGUF), training chat template, model card, provenance label."""

    kind: ClassVar[str] = "export"
    produces: ClassVar[tuple[str, ...]] = ("model",)

    model: str | None = input_field(
        "model", "Stage whose model is exported (default: the latest earlier stage producing one)."
    )
    formats: list[Literal["hf", "gguf"]] = Field(
        default_factory=lambda: ["hf"],
        min_length=1,
        description="hf: safetensors folder (always written); gguf: also GGUF files.",
    )
    gguf_types: list[GGUFType] = Field(
        default_factory=lambda: ["f16", "q8_0"], min_length=1, description="GGUF files to write: f32, f16, bf16, q8_0."
    )
    gguf_required: bool = Field(
        True,
        description="false: skip GGUF (noted in the summary) when the `gguf` package is not installed, instead of failing.",
    )
    max_shard_size: str = Field("2GB", description="Largest safetensors shard (transformers' max_shard_size).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the parity probes run; auto is CUDA when there is a GPU."
    )
    probe_dataset: str | None = dataset_field(
        ("chat", "instruction", "text"),
        "Dataset the probe prompts come from (default: the first training stage's).",
        required=False,
    )
    probes: int = Field(
        6,
        ge=0,
        le=200,
        description="Prompts taken from `probe_dataset`; four built-in bilingual ones are always added.",
    )
    max_new_tokens: int = Field(
        16, ge=1, le=512, description="Greedy tokens generated per probe and compared step by step."
    )
    tolerances: dict[Literal["hf", "f32", "f16", "bf16", "q8_0"], Tolerance] = Field(
        default_factory=dict,
        description="Allowed drift per format (hf, or a GGUF type); default per dtype and GGUF type.",
    )
    producer: str | None = Field(
        None, description="Organisation (or service filing number) named as producer in the provenance label."
    )
    intended_use: str | None = Field(
        None, description="Intended-use text for the model card (a sound default is written otherwise)."
    )
    license: str | None = Field(
        None, description="Licence id for the model card's metadata (e.g. apache-2.0); check the base model's."
    )
    modelfile_system: str | None = Field(
        None, description="Default SYSTEM message of the Ollama Modelfile written beside the GGUF files."
    )
    modelfile_aigc_label: bool = Field(
        False,
        description="Give the Ollama Modelfile a default SYSTEM note carrying the AIGC label (本内容由人工智能生成 · "
        "AI-generated content), before `modelfile_system` if both are set.",
    )
