"""The one builder from a stage's shared training options to a TRL/transformers config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.recipe import Recipe
from finetune.stages.base import TrainingOptions
from finetune.tracking import report_to


def precision_flags(options: TrainingOptions, override: str = "auto") -> dict[str, bool]:
    """bf16/fp16 flags: `distributed.mixed_precision`, else the stage's choice, else bf16 on a GPU that supports it, fp32 on CPU."""
    import torch

    precision = options.precision if override == "auto" else override
    if precision == "auto":
        if torch.cuda.is_available():
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def gradient_checkpointing_on(options: TrainingOptions) -> bool:
    import torch

    if options.gradient_checkpointing == "auto":
        return torch.cuda.is_available()
    return bool(options.gradient_checkpointing)


def build_training_args(
    config_cls: type,
    options: TrainingOptions,
    recipe: Recipe,
    stage_dir: Path,
    run_name: str,
    has_eval: bool,
    **stage_args: Any,
):
    """A `config_cls` (SFTConfig, DPOConfig, ...) from the shared options plus the stage's own arguments.

    The recipe's `distributed` section reaches every trainer stage here: DeepSpeed / FSDP settings,
    gradient clipping and precision overrides, and accumulation derived from a global batch size.
    """
    import torch

    from finetune.distributed import config as distributed_config
    from finetune.distributed.ranks import current

    section = recipe.distributed
    checkpointing = gradient_checkpointing_on(options)
    args: dict[str, Any] = {
        "output_dir": str(stage_dir / "checkpoints"),
        "max_steps": options.max_steps,
        "num_train_epochs": options.epochs,
        "learning_rate": options.learning_rate,
        "lr_scheduler_type": options.lr_scheduler,
        "warmup_steps": options.warmup if options.warmup < 1 else int(options.warmup),
        "per_device_train_batch_size": options.batch_size,
        "per_device_eval_batch_size": options.eval_batch_size or options.batch_size,
        "gradient_accumulation_steps": distributed_config.gradient_accumulation(
            options.batch_size, options.gradient_accumulation, section, current().world_size
        ),
        "weight_decay": options.weight_decay,
        "max_grad_norm": options.max_grad_norm if section.gradient_clipping == "auto" else section.gradient_clipping,
        "optim": options.optimizer,
        **checkpointing_args(config_cls, checkpointing),
        "seed": options.seed,
        "data_seed": options.seed,
        "logging_steps": options.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": options.save_steps,
        "save_total_limit": options.save_total_limit,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": options.eval_steps,
        "eval_on_start": has_eval,
        "report_to": report_to(recipe.tracking),
        "run_name": recipe.tracking.run_name or run_name,
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        **precision_flags(options, section.mixed_precision),
        **distributed_config.trainer_args(section),
    }
    args.update(stage_args)
    return config_cls(**args)


def checkpointing_args(config_cls: type, on: bool) -> dict[str, Any]:
    """Activation checkpointing under the name the installed transformers uses (renamed in 5.2x)."""
    import dataclasses

    # reentrant checkpointing is what PEFT + ZeRO-3 needs (TRL #2514) and works everywhere else
    kwargs = {"use_reentrant": True} if on else None
    names = {f.name for f in dataclasses.fields(config_cls)}
    if "activation_checkpointing" in names:
        return {"activation_checkpointing": on, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": on, "gradient_checkpointing_kwargs": kwargs}


def save_adapter(trainer, folder: Path) -> None:
    """Save the trained adapter as plain PEFT files, loadable without DeepSpeed.

    Every process calls this: under ZeRO-3 or FSDP the Trainer gathers the adapter's shards from all of
    them. Only rank 0 writes, into a temporary folder renamed into place, after checking that the weights
    are really there (an ungathered ZeRO-3 save writes zero-sized tensors: DeepSpeed #7900).
    """
    from finetune.distributed.ranks import barrier, is_main_process
    from finetune.run_dir import atomic_dir

    if is_main_process():
        with atomic_dir(folder) as tmp:
            trainer.save_model(str(tmp))
            check_adapter_weights(tmp)
    else:
        trainer.save_model(str(folder))  # joins the gather; writes nothing off rank 0
    barrier()


ADAPTER_STAGE_OUTPUTS = {"adapter": "adapter", "tokenizer": "tokenizer", "template": "template.json",
                         "metrics": "metrics.jsonl", "data_card": "data_card.md", "register": "sensitive_register.jsonl"}


def save_adapter_stage(trainer, stage_dir: Path, tokenizer, contract: dict) -> dict[str, str]:
    """What every adapter-training stage (sft, dpo, kto, orpo, rlhf) leaves: `adapter/`, `tokenizer/` and
    `template.json`, so `merge`, `evaluate` and `export` read them alike; returns the stage's outputs."""
    from finetune.data.template import write_contract
    from finetune.distributed.ranks import is_main_process
    from finetune.run_dir import atomic_dir

    save_adapter(trainer, stage_dir / "adapter")  # every rank: ZeRO-3 / FSDP gather the shards
    if is_main_process():
        with atomic_dir(stage_dir / "tokenizer") as tmp:
            tokenizer.save_pretrained(tmp)
        write_contract(contract, stage_dir)
    return dict(ADAPTER_STAGE_OUTPUTS)


def check_adapter_weights(folder: Path) -> int:
    """The number of weights in a saved adapter; an error if the file is missing or any tensor is empty."""
    from safetensors import safe_open

    from finetune.errors import WenmaiError

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise WenmaiError(f"saving the adapter wrote no {path.name}; the adapter was not saved")
    total, empty = 0, []
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            size = f.get_slice(key).get_shape()
            count = 1
            for dim in size:
                count *= dim
            total += count
            if count == 0:
                empty.append(key)
    if empty or total == 0:
        raise WenmaiError(
            f"the saved adapter has {len(empty)} empty tensors (e.g. {empty[:1] or 'all'}): the weights were not gathered "
            "from the processes that hold them; with DeepSpeed ZeRO-3 set stage3_gather_16bit_weights_on_model_save: true"
        )
    return total
