"""The one builder from a stage's shared training options to a TRL/transformers config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.recipe import Recipe
from finetune.stages.base import TrainingOptions
from finetune.tracking import report_to


def precision_flags(options: TrainingOptions) -> dict[str, bool]:
    """bf16/fp16 flags: the recipe's choice, or bf16 on a GPU that supports it, fp32 on CPU."""
    import torch

    precision = options.precision
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
    """A `config_cls` (SFTConfig, DPOConfig, ...) from the shared options plus the stage's own arguments."""
    import torch

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
        "gradient_accumulation_steps": options.gradient_accumulation,
        "weight_decay": options.weight_decay,
        "max_grad_norm": options.max_grad_norm,
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
        **precision_flags(options),
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
