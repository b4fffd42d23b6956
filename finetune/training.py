"""The trainer skeleton every trainer stage shares: one builder of TRL/transformers arguments, `fit`, the metrics file.

`build_training_args` turns a stage's shared training options and the recipe's `distributed` and
`tracking` sections into the stage's TRL config. Activation checkpointing is decided once per stage, by
`checkpointing_args`: from the speed plan for a stage that runs one (`finetune.speed.changes` passes it
in), else from the options here. `fit` trains, resuming from a checkpoint, and evaluates after the last
step; `loss_summary` gives the first and last losses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.distributed import config as distributed_config
from finetune.distributed.ranks import current
from finetune.recipe import Recipe, TrainingOptions
from finetune.recipe.secrets import public_run_name
from finetune.run_dir import CHECKPOINTS_DIR
from finetune.tracking import progress_line, report_to

# reentrant checkpointing is what PEFT + ZeRO-3 needs (TRL #2514) and works everywhere else
DEFAULT_CHECKPOINTING_KWARGS = {"use_reentrant": True}


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
    A stage with a speed plan passes its activation-checkpointing arguments in `stage_args`; otherwise the
    options decide them here.
    """
    import torch

    section = recipe.distributed
    planned = any(key.endswith("checkpointing") for key in stage_args)
    checkpointing = {} if planned else checkpointing_args(config_cls, gradient_checkpointing_on(options))
    args: dict[str, Any] = {
        "output_dir": str(stage_dir / CHECKPOINTS_DIR),
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
        **checkpointing,
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
        "run_name": public_run_name(recipe, run_name),
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        **precision_flags(options, section.mixed_precision),
        **distributed_config.trainer_args(section),
    }
    args.update(stage_args)
    return config_cls(**args)


def fit(trainer: Any, resume_from: Path | None, final_eval_every: int | None = None) -> Any:
    """Train (from `resume_from`, a checkpoint of an interrupted attempt); evaluate after the last step too.

    `final_eval_every`: the stage's eval_steps when it has an eval set, so the held-out figures describe the
    trained model and not only the last eval_steps boundary. Returns the trainer's TrainOutput.
    """
    trainer.add_callback(_token_count_callback(trainer))
    if resume_from:
        _restore_token_count(trainer, resume_from)
        # the first attempt logged the evaluation before training (and at every eval boundary up to the
        # checkpoint): evaluating again at the resume step would log that row twice
        trainer.args.eval_on_start = False
    with progress_line(trainer):  # one progress line per stage instead of a printed dict at every log
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if final_eval_every and trainer.state.global_step % final_eval_every:
            trainer.evaluate()
    return result


TOKEN_COUNT_FILE = "wenmai_tokens.json"


def _token_count_callback(trainer: Any) -> Any:
    """A callback that saves TRL's running `num_tokens` count into each checkpoint.

    TRL keeps it in the trainer (`_total_train_tokens`), not in the trainer state a checkpoint holds, so
    without this a resumed stage logs `num_tokens` from 0 again (Axolotl #3291 hit the same).
    """
    from transformers import TrainerCallback

    class TokenCount(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            count = getattr(trainer, "_total_train_tokens", None)
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if count is not None and state.is_world_process_zero and folder.is_dir():
                (folder / TOKEN_COUNT_FILE).write_text(json.dumps({"num_tokens": int(count)}), encoding="utf-8")

    return TokenCount()


def _restore_token_count(trainer: Any, checkpoint: Path) -> None:
    saved = Path(checkpoint) / TOKEN_COUNT_FILE
    if hasattr(trainer, "_total_train_tokens") and saved.is_file():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            trainer._total_train_tokens = int(json.loads(saved.read_text(encoding="utf-8"))["num_tokens"])


def loss_summary(log_history: list[dict], eval_loss: bool = True) -> dict:
    """First and last train loss, and (`eval_loss`) eval loss before and after training, from the trainer's log."""
    losses = [row["loss"] for row in log_history if "loss" in row]
    evals = [row["eval_loss"] for row in log_history if "eval_loss" in row] if eval_loss else []
    summary = {}
    if losses:
        summary.update(first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4))
    if evals:
        summary.update(eval_loss_before=round(evals[0], 4), eval_loss_after=round(evals[-1], 4))
    return summary


def precision_flags(options: TrainingOptions, override: str = "auto") -> dict[str, bool]:
    """bf16/fp16 flags: `distributed.mixed_precision`, else the stage's choice, else bf16 on a GPU that supports it, fp32 on CPU."""
    import torch

    precision = options.precision if override == "auto" else override
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if torch.cuda.is_available() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def gradient_checkpointing_on(options: TrainingOptions) -> bool:
    """Whether activations are recomputed: the option as set (a speed plan sets it), auto: with CUDA."""
    import torch

    if options.gradient_checkpointing == "auto":
        return torch.cuda.is_available()
    return bool(options.gradient_checkpointing)


def checkpointing_args(config_cls: type, on: bool, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Activation checkpointing under the name the installed transformers uses (renamed in 5.2x);
    `kwargs` default to reentrant checkpointing."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    kwargs = (kwargs or DEFAULT_CHECKPOINTING_KWARGS) if on else None
    if "activation_checkpointing" in names:
        return {"activation_checkpointing": on, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": on, "gradient_checkpointing_kwargs": kwargs}


@contextlib.contextmanager
def stage_scope(recipe: Recipe, options: Any, stage_dir: Path, run_name: str) -> Iterator[None]:
    """Around one trainer stage under ZeRO-3 or FSDP: every model the stage loads is loaded for sharding.

    transformers builds a model sharded (zero.Init) and leaves placement to FSDP while training arguments
    for the strategy are alive; the pipeline opens this scope before the stage loads anything (its reward
    model too), so that no stage has to order its own calls for it. Quantized weights are the exception:
    transformers loads them whole, and DeepSpeed shards them when training starts.
    """
    if not isinstance(options, TrainingOptions) or not distributed_config.shards_weights(recipe.distributed):
        yield
        return
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    live = build_training_args(TrainingArguments, options, recipe, stage_dir, run_name, has_eval=False)
    try:
        yield
    finally:
        del live
        unset_hf_deepspeed_config()
