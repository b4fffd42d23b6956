"""The recipe's sections other than `stages`: model, lora, data, reward, tracking, output, distributed.

One pydantic class per section, `extra="forbid"` everywhere. Field descriptions are the documentation:
`wenmai stages` and `wenmai validate` print them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from finetune.errors import Problem
from finetune.recipe.augment import AUGMENT_FORMATS, AugmentSection
from finetune.recipe.data_policy import DataPolicy, RecordMetadata
from finetune.recipe.review import ReviewCleaning, ReviewRecords

DATA_FORMATS = ("chat", "instruction", "text", "pairs", "ratings", "tiers")
_PASSWORD = re.compile(r"://([^:/@]+):[^@]*@")
DEFAULT_DIMENSION = "overall"  # the one reward dimension of a recipe without a `reward` section


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # names of this section's fields whose value came from `${env:...}` (set by `finetune.recipe.secrets`)
    _from_env: frozenset[str] = PrivateAttr(default=frozenset())


class ModelSection(Section):
    """The base model and how to load it."""

    path: str = Field(
        ...,
        description="Local folder, hub id (needs the model in the local hub cache when offline), "
        "or `pkg:NAME` for a model shipped inside an installed Python package.",
        json_schema_extra={"is_path": "maybe"},
    )
    gguf_file: str | None = Field(
        None,
        description="A GGUF file inside `path`; converted once to a float folder in `cache_dir` and trained from there.",
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
        description="Chat template when the tokenizer has none or to replace it: a name (chatml, qwen2_5, qwen3, "
        "qwen3_nothink, llama3_1, llama3_2, deepseek_r1_distill, glm4, internlm3, mistral) or a path to a .jinja file.",
    )
    end_of_turn: str | None = Field(
        None,
        description="The token that ends an assistant turn (e.g. <|im_end|>); training checks the template ends "
        "turns with it, and learns it after each assistant turn even where the template writes none (GLM-4).",
    )
    pad_token: str | None = Field(
        None, description="Token batches are padded with (default: the tokenizer's, else its EOS token)."
    )
    modelscope: str | None = Field(
        None,
        description="The model's ModelScope id, for machines that cannot reach Hugging Face: download it with "
        "`modelscope download --model ID --local_dir DIR` and set `path: DIR`.",
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with the model; off unless you trust it.")
    cache_dir: str = Field(
        "~/.cache/wenmai/models",
        description="Where converted models (from GGUF) are kept.",
        json_schema_extra={"is_path": True},
    )


class LoraSection(Section):
    """The LoRA adapter every training stage trains (PEFT)."""

    r: int = Field(16, gt=0, le=4096, description="Adapter rank (LoRA ranks above a few hundred buy nothing).")
    alpha: int = Field(32, gt=0, description="Scaling numerator (scale = alpha / r, or alpha / sqrt(r) for rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    targets: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="`all-linear` or a list of module names (q_proj, v_proj, ...)."
    )
    variant: Literal["lora", "dora", "rslora"] = Field("lora", description="Plain LoRA, DoRA, or rank-stabilised LoRA.")


class DatasetSection(Section):
    """A named dataset: a file, or a session of the review store (`format: review`)."""

    path: str | None = Field(
        None,
        description="JSONL, JSON, Parquet or CSV file (relative to the recipe); not for `format: review`.",
        json_schema_extra={"is_path": True},
    )
    format: Literal["chat", "instruction", "text", "pairs", "ratings", "tiers", "review"] = Field(
        ...,
        description="chat: `messages`; instruction: `instruction`/`input`/`output`; text: `text`; "
        "pairs: `prompt`/`chosen`/`rejected` (or hh-rlhf transcripts), optional `dimension`, `margin`; "
        "ratings: `prompt`/`response`/`scores` {dimension: 1..5}, optional `rater`; "
        "tiers: `prompt` and `responses` [{response, tier}], tiers ranked by `tier_order`; "
        "review: the latest feedback of a review-store session (`db`, `session`, `records`), cleaned on read.",
    )
    db: str | None = Field(
        None,
        description="format review: the review store, a SQLite file (relative to the recipe) or a database URL "
        "(postgresql+psycopg://...; put a password in `${env:VAR}`, never in the recipe).",
        json_schema_extra={"is_path": True},
    )
    session: str | None = Field(None, description="format review: the review session's name.")
    records: ReviewRecords | None = Field(
        None,
        description="format review: which records the session gives: ratings (expert 1-5 scores per dimension), "
        "pairs (A/B choices), or chat (reviewers' corrected answers).",
    )
    cleaning: ReviewCleaning = Field(
        default_factory=ReviewCleaning, description="format review: how the feedback is cleaned before it trains."
    )
    as_of: datetime | None = Field(
        None,
        description="format review: read the reviews stored up to this time (UTC). A run sets it when it starts, "
        "so its recipe.yaml names exactly the feedback it trained on and a resumed run reads the same.",
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
        None,
        description="Rights and provenance for records that do not carry their own: licence, source, "
        "rights_holder, sensitivity, topics, consent (a record's own fields win).",
    )

    @model_validator(mode="after")
    def _source(self) -> DatasetSection:
        if self.format == "review":
            missing = [key for key in ("db", "session", "records") if getattr(self, key) is None]
            if missing:
                raise ValueError(
                    f"a review dataset needs {', '.join(missing)} (db: the review store, session: its name, "
                    "records: ratings, pairs or chat)"
                )
            if self.path is not None:
                raise ValueError("a review dataset reads `db` and `session`, not `path`; remove `path`")
        else:
            if self.path is None:
                raise ValueError("a dataset needs `path` (JSONL, JSON, Parquet or CSV file)")
            given = [key for key in ("db", "session", "records", "as_of") if getattr(self, key) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} belong to `format: review` datasets; remove them")
        return self

    @property
    def record_format(self) -> str:
        """The format of the records this dataset gives (a review dataset gives ratings, pairs or chat)."""
        return self.records if self.format == "review" and self.records else self.format

    @property
    def location(self) -> str:
        """Where the records come from, for messages and data cards: the file, or the store and session."""
        if self.format != "review":
            return str(self.path)
        shown = _PASSWORD.sub(r"://\1:***@", str(self.db))  # a password given in the URL is never shown
        return f"{shown}#{self.session}"


class DataSection(BaseModel):
    """Named datasets (any key), `policy`, the rules every record passes before it trains, and `augment`.

    Reads like a mapping of dataset name -> DatasetSection (`data[name]`, `name in data`, iteration),
    so `policy` and `augment` are the names a dataset cannot have.
    """

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, DatasetSection] = Field(init=False)  # type: ignore[assignment]
    policy: DataPolicy = Field(
        default_factory=DataPolicy, description="Rights, sensitivity, PII and dedup rules for every dataset."
    )
    augment: AugmentSection | None = Field(
        None, description="Counterfactual augmentation: training records copied with group terms swapped."
    )

    @model_validator(mode="before")
    @classmethod
    def _policy_typo(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                close = key not in ("policy", "augment") and difflib.get_close_matches(
                    str(key), ["policy", "augment"], n=1, cutoff=0.7
                )
                if close and not (isinstance(value, dict) and "path" in value):
                    raise ValueError(
                        f"{key!r} is neither `{close[0]}` nor a dataset (a dataset has path: and format:) "
                        f"— did you mean {close[0]}?"
                    )
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
        for name, section in self.items():
            if section.defaults is not None:
                out += [
                    Problem(f"data.{name}.defaults.{field}", message)
                    for field, message in self.policy.metadata_problems(section.defaults)
                ]
        for i, name in enumerate(self.augment.datasets or [] if self.augment else []):
            if name not in self:
                known = ", ".join(self) or "none"
                out.append(Problem(f"data.augment.datasets[{i}]", f"no dataset {name!r} in data (datasets: {known})"))
            elif self[name].record_format not in AUGMENT_FORMATS:
                out.append(
                    Problem(
                        f"data.augment.datasets[{i}]",
                        f"{name} has format {self[name].record_format}; augmentation copies "
                        f"{', '.join(AUGMENT_FORMATS)} records",
                    )
                )
        return out

    def policy_files(self) -> list[tuple[str, str]]:
        """(key under data.policy, path) of every file the policy names; the pre-flight checks they exist."""
        files = [("topic_list", self.policy.topic_list), ("pii.name_list", self.policy.pii.name_list)]
        files += [(f"dedup.check_against[{i}]", p) for i, p in enumerate(self.policy.dedup.check_against)]
        return [(key, path) for key, path in files if path]


class RewardDimension(Section):
    """One thing a reward model judges, with its weight in the total."""

    name: str = Field(
        ...,
        pattern=r"^[a-z][a-z0-9_]*$",
        description="Dimension name (lowercase, e.g. `safety`); data and later stages refer to it.",
    )
    description: str = Field("", description="What the dimension judges, in the raters' words.")
    weight: float = Field(
        1.0, ge=0, description="Weight in the total reward (the total is the weighted mean of the dimensions)."
    )

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


class RoundSection(Section):
    """Set by `wenmai iterate`: the run this round continues, and the feedback it learned from."""

    parent: str = Field(..., description="The parent run folder.", json_schema_extra={"is_path": True})
    number: int = Field(..., ge=2, description="This round's number (the first run is round 1).")
    feedback: str = Field("", description="The review store and session the round's feedback came from.")


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
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow server or folder (default: mlruns/ in the run folder)."
    )


class OutputSection(Section):
    """Where runs go, and the language of what a run writes for people to read."""

    root: str = Field("runs", description="Folder holding run folders (relative to the current directory).")
    language: Literal["zh", "en"] = Field(
        "zh", description="Language of the run report (report.html) and the export's model card: zh (中文) or en."
    )


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
    nvme_path: str | None = Field(
        None, description="Folder on a local NVMe drive for nvme offload.", json_schema_extra={"is_path": True}
    )
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
        deepspeed_only, offload = (
            {"zero_stage", "deepspeed_config"},
            {"offload_optimizer", "offload_params", "nvme_path"},
        )
        foreign = given & {
            "none": deepspeed_only | offload,
            "ddp": deepspeed_only | offload,
            "fsdp": deepspeed_only,
        }.get(self.strategy, set())
        for key in sorted(foreign):
            where = "deepspeed or fsdp" if key == "offload_params" else "deepspeed"
            problems.append(
                (
                    key,
                    f"applies to strategy {where}, and strategy is {self.strategy}; "
                    "set distributed.strategy or remove the key",
                )
            )
        if self.deepspeed_config and {"zero_stage", "offload_optimizer", "offload_params"} & self.model_fields_set:
            problems.append(
                (
                    "deepspeed_config",
                    "set either your own DeepSpeed JSON or zero_stage/offload_*, not both; "
                    "the JSON's zero_optimization section decides those",
                )
            )
        if (
            self.strategy == "deepspeed"
            and self.offload_params != "none"
            and self.zero_stage < 3
            and not self.deepspeed_config
        ):
            problems.append(
                (
                    "offload_params",
                    f"DeepSpeed offloads weights only with ZeRO-3 (zero_stage is {self.zero_stage}); "
                    "set zero_stage: 3 or offload_params: none",
                )
            )
        if self.strategy == "fsdp" and "nvme" in (self.offload_params, self.offload_optimizer):
            problems.append(("offload_params", "fsdp offloads to cpu only; use strategy: deepspeed for nvme"))
        if self.strategy == "fsdp" and self.offload_optimizer != "none" and self.offload_params == "none":
            problems.append(
                (
                    "offload_optimizer",
                    "fsdp offloads weights, gradients and optimiser states together; "
                    "set offload_params: cpu (and leave offload_optimizer unset)",
                )
            )
        if "nvme" in (self.offload_params, self.offload_optimizer) and not self.nvme_path:
            problems.append(("nvme_path", "nvme offload needs nvme_path: a folder on a local NVMe drive"))
        return problems


def reward_dimensions(recipe: Any) -> list[RewardDimension]:
    """The recipe's reward dimensions, or the single default dimension when it declares none."""
    if recipe.reward is None:
        return [RewardDimension(name=DEFAULT_DIMENSION, description="Overall preference.")]
    return list(recipe.reward.dimensions)
