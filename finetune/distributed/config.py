"""The recipe's `distributed` section as DeepSpeed / FSDP settings for the transformers Trainer.

The DeepSpeed config is a template with `auto` values; transformers fills them from each stage's
training arguments (batch, accumulation, clipping, precision, learning rate), so one template serves
every trainer stage. `configs/deepspeed/*.json` are exactly what `template()` generates for the
shipped settings (a test keeps them equal).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config_io import CONFIGS_DIR
from finetune.errors import WenmaiError
from finetune.recipe import DistributedSection

DEEPSPEED_DIR = CONFIGS_DIR / "deepspeed"
SHIPPED = {  # name -> the section keys it stands for
    "zero2": {"zero_stage": 2},
    "zero3": {"zero_stage": 3},
    "zero3_offload": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"},
}


@dataclass(frozen=True)
class Zero:
    """What pre-flight and the memory estimate need to know about a DeepSpeed config."""

    stage: int
    offload_optimizer: str  # none | cpu | nvme
    offload_params: str
    gathers_on_save: bool  # stage3_gather_16bit_weights_on_model_save: adapters saved whole, not empty


def template(section: DistributedSection) -> dict[str, Any]:
    """The DeepSpeed config for the section: the user's JSON, a shipped one, or generated from the keys."""
    if section.deepspeed_config:
        return read_deepspeed_json(section.deepspeed_config)
    zero: dict[str, Any] = {
        "stage": section.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if section.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                # without it a ZeRO-3 save writes an empty adapter (DeepSpeed #7900, peft #453)
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    for key, device in (("offload_optimizer", section.offload_optimizer), ("offload_param", section.offload_params)):
        if device != "none":
            zero[key] = {"device": device, "pin_memory": True}
            if device == "nvme":
                zero[key]["nvme_path"] = section.nvme_path
    config: dict[str, Any] = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }
    if section.offload_optimizer != "none":
        # an offloaded optimiser must be DeepSpeed's own (CPU Adam); transformers fills its hyper-parameters
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return config


def read_deepspeed_json(value: str) -> dict[str, Any]:
    """A DeepSpeed JSON by shipped name (`zero3`) or path; a clear error when missing or not JSON."""
    path = DEEPSPEED_DIR / f"{value}.json" if value in SHIPPED else Path(value).expanduser()
    if not path.is_file():
        raise WenmaiError(
            f"distributed.deepspeed_config: {value} not found; give a JSON file (relative to the recipe) "
            f"or a shipped name: {', '.join(SHIPPED)}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WenmaiError(f"distributed.deepspeed_config: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise WenmaiError(f"distributed.deepspeed_config: {path} must hold a JSON object")
    return config


def describe(config: dict[str, Any]) -> Zero:
    """ZeRO stage, offload targets and the save-gather flag of a DeepSpeed config."""
    zero = config.get("zero_optimization") or {}

    def device(key: str) -> str:
        value = zero.get(key) or {}
        return str(value.get("device", "none")) if isinstance(value, dict) else "none"

    stage = zero.get("stage", 0)
    return Zero(
        stage=int(stage) if isinstance(stage, int | str) and str(stage).isdigit() else 0,
        offload_optimizer=device("offload_optimizer"),
        offload_params=device("offload_param"),
        gathers_on_save=bool(
            zero.get("stage3_gather_16bit_weights_on_model_save", zero.get("gather_16bit_weights_on_model_save"))
        ),
    )


def zero_settings(section: DistributedSection) -> Zero | None:
    """The ZeRO settings in force, or None when the strategy is not deepspeed."""
    return describe(template(section)) if section.strategy == "deepspeed" else None


def shards_weights(section: DistributedSection) -> bool:
    """True when each process holds only a slice of the weights (ZeRO-3, FSDP)."""
    if section.strategy == "fsdp":
        return True
    zero = zero_settings(section)
    return zero is not None and zero.stage == 3


def gradient_accumulation(
    stage_batch: int, stage_accumulation: int, section: DistributedSection, world_size: int
) -> int:
    """Micro-batches per optimiser step: the stage's own, or derived from `distributed.global_batch_size`."""
    if section.global_batch_size is None:
        return stage_accumulation
    steps, rest = divmod(section.global_batch_size, stage_batch * world_size)
    if rest or steps < 1:
        raise WenmaiError(
            f"distributed.global_batch_size: {section.global_batch_size} is not a multiple of batch_size {stage_batch} x "
            f"{world_size} processes = {stage_batch * world_size}; {batch_fix(section.global_batch_size, stage_batch, world_size)}"
        )
    return steps


def batch_fix(global_batch: int, stage_batch: int, world_size: int) -> str:
    """How to make a global batch divisible: the nearest multiples of batch_size x processes."""
    unit = stage_batch * world_size
    nearest = [str(v) for v in ((global_batch // unit) * unit, (global_batch // unit + 1) * unit) if v > 0]
    return f"set global_batch_size to {' or '.join(nearest)} (multiples of {unit}), or change batch_size or the number of processes"


def trainer_args(section: DistributedSection) -> dict[str, Any]:
    """Training arguments for the strategy: `deepspeed=` (a fresh copy: transformers fills it in place) or FSDP."""
    if section.strategy == "deepspeed":
        return {"deepspeed": copy.deepcopy(template(section))}
    if section.strategy == "fsdp":
        fsdp_config = {
            "version": 2,
            "reshard_after_forward": True,
            "cpu_offload": section.offload_params == "cpu",
            "cpu_ram_efficient_loading": True,
            "state_dict_type": "FULL_STATE_DICT",  # adapters saved whole, as plain PEFT files
        }
        return {"fsdp": True, "fsdp_config": fsdp_config}
    # DDP (ddp, or any launch of several processes): every LoRA parameter gets a gradient each step, and
    # searching for unused ones breaks reentrant activation checkpointing (transformers only knows to turn
    # the search off for a bare PreTrainedModel, not for a PeftModel)
    return {"ddp_find_unused_parameters": False}
