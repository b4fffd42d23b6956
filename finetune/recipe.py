"""The recipe schema: one pydantic class per section, `extra="forbid"` everywhere.

Field descriptions are the documentation: `wenmai stages` and `wenmai validate` print them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from finetune.data.policy import DataPolicy, RecordMetadata
from finetune.errors import Problem
from finetune.speed import problems as speed_problems
from finetune.stages import STAGES
from finetune.stages.base import StageConfig

DATA_FORMATS = ("chat", "instruction", "text", "pairs", "ratings", "tiers")
DEFAULT_DIMENSION = "overall"  # the one reward dimension of a recipe without a `reward` section


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    """The base model and how to load it."""

    path: str = Field(
        ...,
        description="Local folder, hub id (needs the model in the local hub cache when offline), "
        "or `pkg:NAME` for a model shipped inside an installed Python package.",
        json_schema_extra={"is_path": "maybe"},
    )
    gguf_file: str | None = Field(
        None, description="A GGUF file inside `path`; converted once to a float folder in `cache_dir` and trained from there."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto is bfloat16 on a GPU that supports it, else float32."
    )
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none", description="Load the base quantised with bitsandbytes (QLoRA); needs CUDA and the `gpu` extra."
    )
    attention: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="Attention implementation.")
    chat_template: str | None = Field(
        None,
        description="Chat template when the tokenizer has none or to replace it: `chatml`, or a path to a .jinja file.",
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with the model; off unless you trust it.")
    cache_dir: str = Field(
        "~/.cache/wenmai/models", description="Where converted models (from GGUF) are kept.", json_schema_extra={"is_path": True}
    )


class LoraSection(Section):
    """The LoRA adapter every training stage trains (PEFT)."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: int = Field(32, gt=0, description="Scaling numerator (scale = alpha / r, or alpha / sqrt(r) for rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    targets: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="`all-linear` or a list of module names (q_proj, v_proj, ...)."
    )
    variant: Literal["lora", "dora", "rslora"] = Field("lora", description="Plain LoRA, DoRA, or rank-stabilised LoRA.")


class DatasetSection(Section):
    """A named dataset file."""

    path: str = Field(..., description="JSONL, JSON, Parquet or CSV file (relative to the recipe).", json_schema_extra={"is_path": True})
    format: Literal["chat", "instruction", "text", "pairs", "ratings", "tiers"] = Field(
        ...,
        description="chat: `messages`; instruction: `instruction`/`input`/`output`; text: `text`; "
        "pairs: `prompt`/`chosen`/`rejected` (or hh-rlhf transcripts), optional `dimension`, `margin`; "
        "ratings: `prompt`/`response`/`scores` {dimension: 1..5}, optional `rater`; "
        "tiers: `prompt` and `responses` [{response, tier}], tiers ranked by `tier_order`.",
    )
    on_bad_record: Literal["fail", "skip"] = Field(
        "fail", description="fail: stop at the first bad record; skip: drop bad records and report how many."
    )
    max_records: int | None = Field(None, gt=0, description="Use only the first N records (quick experiments).")
    system_prompt: str | None = Field(None, description="System message added to records that have none.")
    tier_order: list[str] | None = Field(
        None, min_length=2, description="tiers format: the tier labels, best first (e.g. [good, acceptable, harmful])."
    )
    defaults: RecordMetadata | None = Field(
        None, description="Rights and provenance for records that do not carry their own: licence, source, "
        "rights_holder, sensitivity, topics, consent (a record's own fields win).",
    )


class DataSection(BaseModel):
    """Named datasets (any key) and `policy`, the rules every record passes before it trains.

    Reads like a mapping of dataset name -> DatasetSection (`data[name]`, `name in data`, iteration),
    so `policy` is the one name a dataset cannot have.
    """

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, DatasetSection] = Field(init=False)  # type: ignore[assignment]
    policy: DataPolicy = Field(default_factory=DataPolicy, description="Rights, sensitivity, PII and dedup rules for every dataset.")

    @model_validator(mode="before")
    @classmethod
    def _policy_typo(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                close = key != "policy" and difflib.get_close_matches(str(key), ["policy"], n=1, cutoff=0.7)
                if close and not (isinstance(value, dict) and "path" in value):
                    raise ValueError(f"{key!r} is neither `policy` nor a dataset (a dataset has path: and format:) "
                                     "— did you mean policy?")
        return data

    @property
    def datasets(self) -> dict[str, DatasetSection]:
        """Every dataset by name (the keys of `data` other than `policy`)."""
        return dict(self.__pydantic_extra__ or {})

    def __getitem__(self, name: str) -> DatasetSection:
        return self.datasets[name]

    def __contains__(self, name: object) -> bool:
        return name in self.datasets

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self.datasets)

    def __len__(self) -> int:
        return len(self.datasets)

    def keys(self):
        """Dataset names."""
        return self.datasets.keys()

    def values(self):
        """Dataset sections."""
        return self.datasets.values()

    def items(self):
        """(name, section) pairs."""
        return self.datasets.items()

    def get(self, name: str, default: DatasetSection | None = None) -> DatasetSection | None:
        """The dataset `name`, or `default`."""
        return self.datasets.get(name, default)

    def problems(self) -> list[Problem]:
        """The policy's own problems and metadata defaults it does not accept, with their key paths."""
        out = [Problem(f"data.policy.{field}", message) for field, message in self.policy.check()]
        files = [("topic_list", self.policy.topic_list), ("pii.name_list", self.policy.pii.name_list)]
        files += [(f"dedup.check_against[{i}]", p) for i, p in enumerate(self.policy.dedup.check_against)]
        out += [Problem(f"data.policy.{key}", f"{path} not found") for key, path in files if path and not Path(path).exists()]
        for name, section in self.items():
            if section.defaults is not None:
                out += [Problem(f"data.{name}.defaults.{field}", message)
                        for field, message in self.policy.metadata_problems(section.defaults)]
        return out


class RewardDimension(Section):
    """One thing a reward model judges, with its weight in the total."""

    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]*$", description="Dimension name (lowercase, e.g. `safety`); data and later stages refer to it.")
    description: str = Field("", description="What the dimension judges, in the raters' words.")
    weight: float = Field(1.0, ge=0, description="Weight in the total reward (the total is the weighted mean of the dimensions).")

    @field_validator("name")
    @classmethod
    def _not_total(cls, name: str) -> str:
        if name == "total":
            raise ValueError("`total` is reserved for the weighted total; name the dimension differently")
        return name


class RewardSection(Section):
    """Reward dimensions, declared once: the reward stage trains one head each; later stages refer to them by name."""

    dimensions: list[RewardDimension] = Field(..., min_length=1, description="The dimensions, in head order.")

    @model_validator(mode="after")
    def _unique_and_weighted(self) -> RewardSection:
        names = [d.name for d in self.dimensions]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"dimension names must be unique; repeated: {', '.join(repeated)}")
        if sum(d.weight for d in self.dimensions) <= 0:
            raise ValueError("at least one dimension needs a weight above 0, or the total reward is undefined")
        return self


class TrackingSection(Section):
    """Where metrics go; `metrics.jsonl` in each stage folder is always written."""

    backends: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["jsonl"], description="Dashboards to stream to, besides metrics.jsonl."
    )
    project: str = Field("wenmai", description="Project (wandb) or experiment (mlflow) name.")
    run_name: str | None = Field(None, description="Dashboard run name (default: the run folder's name).")
    wandb_mode: Literal["auto", "online", "offline"] = Field(
        "auto", description="auto: online when WANDB_API_KEY is set or you are logged in, else offline."
    )
    mlflow_tracking_uri: str | None = Field(None, description="MLflow server or folder (default: mlruns/ in the run folder).")


class OutputSection(Section):
    """Where runs go."""

    root: str = Field("runs", description="Folder holding run folders (relative to the current directory).")


class DistributedSection(Section):
    """How training is spread over GPUs and nodes; `wenmai launch` starts one process per GPU."""

    strategy: Literal["none", "ddp", "deepspeed", "fsdp"] = Field(
        "none",
        description="none: one process; ddp: data parallel, every GPU holds the whole model; deepspeed: ZeRO "
        "sharding and offload; fsdp: PyTorch FSDP2 through accelerate.",
    )
    zero_stage: Literal[1, 2, 3] = Field(
        2, description="deepspeed: ZeRO stage; 1 shards optimiser states, 2 also gradients, 3 also the weights."
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field(
        "none", description="deepspeed: keep optimiser states in host memory (cpu) or on a local NVMe drive (nvme)."
    )
    offload_params: Literal["none", "cpu", "nvme"] = Field(
        "none", description="Keep weights in host memory or on NVMe between uses (deepspeed ZeRO-3; fsdp: cpu)."
    )
    nvme_path: str | None = Field(None, description="Folder on a local NVMe drive for nvme offload.", json_schema_extra={"is_path": True})
    deepspeed_config: str | None = Field(
        None,
        description="Your own DeepSpeed JSON file, or a shipped one by name (zero2, zero3, zero3_offload in "
        "configs/deepspeed/); replaces zero_stage and the offload keys. `auto` values are filled for each stage.",
        json_schema_extra={"is_path": "maybe"},
    )
    gradient_clipping: float | Literal["auto"] = Field(
        "auto", description="Clip gradients to this norm in every trainer stage; auto: each stage's max_grad_norm."
    )
    mixed_precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision for every trainer stage; auto: each stage's own `precision`."
    )
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="Sequences per optimiser step over all processes; each stage's gradient accumulation becomes "
        "global / (batch_size x processes), so the recipe trains alike on 1 or 64 GPUs. Unset: batch_size x "
        "gradient_accumulation x processes.",
    )

    def check(self) -> list[tuple[str, str]]:
        """Contradictions inside the section (no machine, no world size needed)."""
        problems = []
        given = {k for k in self.model_fields_set if getattr(self, k) not in (None, "none")}
        deepspeed_only, offload = {"zero_stage", "deepspeed_config"}, {"offload_optimizer", "offload_params", "nvme_path"}
        foreign = given & {"none": deepspeed_only | offload, "ddp": deepspeed_only | offload, "fsdp": deepspeed_only}.get(self.strategy, set())
        for key in sorted(foreign):
            where = "deepspeed or fsdp" if key == "offload_params" else "deepspeed"
            problems.append((key, f"applies to strategy {where}, and strategy is {self.strategy}; "
                                  "set distributed.strategy or remove the key"))
        if self.deepspeed_config and {"zero_stage", "offload_optimizer", "offload_params"} & self.model_fields_set:
            problems.append(("deepspeed_config", "set either your own DeepSpeed JSON or zero_stage/offload_*, not both; "
                                                 "the JSON's zero_optimization section decides those"))
        if self.strategy == "deepspeed" and self.offload_params != "none" and self.zero_stage < 3 and not self.deepspeed_config:
            problems.append(("offload_params", f"DeepSpeed offloads weights only with ZeRO-3 (zero_stage is {self.zero_stage}); "
                                               "set zero_stage: 3 or offload_params: none"))
        if self.strategy == "fsdp" and "nvme" in (self.offload_params, self.offload_optimizer):
            problems.append(("offload_params", "fsdp offloads to cpu only; use strategy: deepspeed for nvme"))
        if self.strategy == "fsdp" and self.offload_optimizer != "none" and self.offload_params == "none":
            problems.append(("offload_optimizer", "fsdp offloads weights, gradients and optimiser states together; "
                                                  "set offload_params: cpu (and leave offload_optimizer unset)"))
        if "nvme" in (self.offload_params, self.offload_optimizer) and not self.nvme_path:
            problems.append(("nvme_path", "nvme offload needs nvme_path: a folder on a local NVMe drive"))
        return problems


class _StageEntryBase(BaseModel):
    """One item of `stages:` — a mapping with exactly one key, the stage kind."""

    model_config = ConfigDict(extra="forbid")
    __stage_entry__: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data:
            kinds = ", ".join(STAGES)
            raise ValueError(f"a stage is a mapping with one key, its kind ({kinds}); e.g. `- sft: {{dataset: train}}`")
        if len(data) > 1:
            raise ValueError(f"a stage has exactly one kind, got {', '.join(map(str, data))}; start each stage with its own `-`")
        return {k: ({} if v is None else v) for k, v in data.items()}

    @model_serializer(mode="wrap")
    def _dump_own_kind(self, handler: Any) -> Any:
        # `{kind: options}` only: the other kinds (all None) would make the dumped recipe unreadable
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @property
    def config(self) -> StageConfig:
        return next(v for v in (getattr(self, k) for k in type(self).model_fields) if v is not None)


StageEntry = create_model(
    "StageEntry",
    __base__=_StageEntryBase,
    **{kind: (module.Config | None, Field(None, description=(module.Config.__doc__ or "").strip())) for kind, module in STAGES.items()},
)


class Recipe(Section):
    """A Wenmai recipe."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Recipe name; run folders are named after it.")
    model: ModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(..., description="Named datasets that stages read, and the data `policy`.")
    stages: list[StageEntry] = Field(..., min_length=1, description="Stages, run in order.")  # type: ignore[valid-type]
    reward: RewardSection | None = Field(
        None, description=f"Reward dimensions and their weights (default: one dimension, `{DEFAULT_DIMENSION}`)."
    )
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    output: OutputSection = Field(default_factory=OutputSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)

    def stage_configs(self) -> list[StageConfig]:
        return [entry.config for entry in self.stages]

    def stage(self, name: str) -> StageConfig:
        return next(c for c in self.stage_configs() if c.stage_name == name)


def reward_dimensions(recipe: Recipe) -> list[RewardDimension]:
    """The recipe's reward dimensions, or the single default dimension when it declares none."""
    if recipe.reward is None:
        return [RewardDimension(name=DEFAULT_DIMENSION, description="Overall preference.")]
    return list(recipe.reward.dimensions)


def check_dimension_names(recipe: Recipe, names: str | list[str] | dict[str, object] | None, path: str) -> list[Problem]:
    """Problems for names (a name, a list, or a mapping keyed by name) that the `reward` section does not declare."""
    if names is None:
        return []
    wanted = [names] if isinstance(names, str) else list(names)
    declared = [d.name for d in reward_dimensions(recipe)]
    problems = []
    for name in wanted:
        if name in declared or name == "total":
            continue
        guess = difflib.get_close_matches(str(name), declared, n=1, cutoff=0.6)
        hint = f"did you mean {guess[0]}? " if guess else ""
        where = "the recipe's `reward` section declares" if recipe.reward else "no `reward` section, so the only dimension is"
        problems.append(Problem(path, f"unknown reward dimension {name!r}; {hint}{where}: {', '.join(declared)}"))
    return problems


def wiring(recipe: Recipe) -> tuple[dict[str, dict[str, str]], list[Problem]]:
    """Resolve each stage's inputs to earlier stage names: explicit names, or the latest producer."""
    resolved: dict[str, dict[str, str]] = {}
    problems: list[Problem] = []
    earlier: list[StageConfig] = []
    for i, config in enumerate(recipe.stage_configs()):
        inputs: dict[str, str] = {}
        for field_name, info in type(config).model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if extra.get("input") is None:
                continue
            kinds = extra["input"] if isinstance(extra["input"], list) else [extra["input"]]
            output = " or ".join(kinds)
            path = f"stages[{i}].{config.kind}.{field_name}"
            wanted = getattr(config, field_name)
            producers = [c.stage_name for c in earlier if set(kinds) & set(c.produces)]
            if wanted in extra.get("special", ()):  # a value that names no stage, e.g. `base`
                continue
            if wanted is None:
                if producers:
                    inputs[field_name] = producers[-1]
                elif not _input_optional(config, field_name):
                    other = "".join(f", or set `{field_name}: {s}`" for s in extra.get("special", ()))
                    problems.append(Problem(path, f"needs an earlier stage that produces {_article(output)} {output}, and there is none; "
                                                  f"add one before this stage or name one with `{field_name}:`{other}"))
            elif wanted in producers:
                inputs[field_name] = wanted
            else:
                later = [c.stage_name for c in recipe.stage_configs()[i:]]
                why = "comes later (stages read only earlier stages)" if wanted in later else "is not a stage name"
                choices = ", ".join(producers) or "none"
                problems.append(Problem(path, f"{wanted!r} {why}; earlier stages producing {_article(output)} {output}: {choices}"))
        resolved[config.stage_name] = inputs
        earlier.append(config)
    return resolved, problems


def _input_optional(config: StageConfig, field_name: str) -> bool:
    return field_name in getattr(config, "optional_inputs", ())


def cross_checks(recipe: Recipe) -> list[Problem]:
    """Checks across sections that the field types alone cannot express."""
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for i, config in enumerate(recipe.stage_configs()):
        name = config.stage_name
        if name in seen:
            problems.append(Problem(f"stages[{i}].{config.kind}.name", f"stage name {name!r} is already used by stages[{seen[name]}]; "
                                                                     "give each stage a unique `name:`"))
        seen.setdefault(name, i)
        for field_name, info in type(config).model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            formats = extra.get("dataset")
            value = getattr(config, field_name)
            if formats is None or value is None:
                continue
            path = f"stages[{i}].{config.kind}.{field_name}"
            if value not in recipe.data:
                problems.append(Problem(path, f"dataset {value!r} is not in `data` (defined: {', '.join(recipe.data) or 'none'})"))
            elif recipe.data[value].format not in formats:
                problems.append(Problem(path, f"dataset {value!r} has format {recipe.data[value].format!r}; "
                                              f"a {config.kind} stage reads {' or '.join(formats)}"))
        problems += stage_dimension_problems(recipe, config, f"stages[{i}].{config.kind}")
        problems += [Problem(f"stages[{i}].{config.kind}.{p.path}", p.message) for p in config_checks(config, recipe)]
    problems += recipe.data.problems()
    for name, section in recipe.data.items():
        if section.format == "tiers" and not section.tier_order:
            problems.append(Problem(f"data.{name}.tier_order", "a tiers dataset needs `tier_order`: its tier labels, best first "
                                                              "(e.g. [good, acceptable, harmful])"))
    if recipe.model.gguf_file and recipe.model.quantization != "none":
        problems.append(Problem("model.quantization", "a GGUF model is converted to a float model first; "
                                                      "quantize the converted folder instead, or set quantization: none"))
    problems += [Problem(f"distributed.{field}", message) for field, message in recipe.distributed.check()]
    problems += speed_problems(recipe)
    problems += wiring(recipe)[1]
    return problems


def stage_dimension_problems(recipe: Recipe, config: StageConfig, prefix: str) -> list[Problem]:
    """Unknown reward dimensions in a stage's fields made with `dimension_field` (rlhf weights, gates...)."""
    problems: list[Problem] = []
    for field_name, info in type(config).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("dimensions"):
            problems += check_dimension_names(recipe, getattr(config, field_name), f"{prefix}.{field_name}")
    return problems


def config_checks(config: StageConfig, recipe: Recipe | None = None) -> list[Problem]:
    """A stage's own checks, as (field, message) pairs: `check()` across its fields, and
    `check_in_recipe(recipe)` for what needs the rest of the recipe (files it reads, other sections)."""
    check = getattr(config, "check", None)
    pairs = list(check() if check else [])
    in_recipe = getattr(config, "check_in_recipe", None)
    if in_recipe is not None and recipe is not None:
        pairs += in_recipe(recipe)
    return [Problem(field, message) for field, message in pairs]


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"
