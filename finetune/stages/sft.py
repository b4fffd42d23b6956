"""Stage `sft`: LoRA / QLoRA / DoRA supervised fine-tuning with TRL's SFTTrainer.

Writes `adapter/` (plain PEFT), `tokenizer/` and `template.json` (the template contract starts here).
The options are `finetune.recipe.SftOptions`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune import model as model_path
from finetune import speed, varlen
from finetune.adapters import save_adapter_stage
from finetune.data import tokenize_records
from finetune.data.mixing import tokenize_mixture
from finetune.data.template import training_contract
from finetune.distributed.ranks import current
from finetune.recipe import Recipe, SftOptions
from finetune.run_dir import StageContext, StageResult
from finetune.tracking import jsonl_callback
from finetune.training import build_training_args, fit, loss_summary


def run(ctx: StageContext) -> StageResult:
    """Train the adapter and save it, the tokenizer and the template contract into the stage folder."""
    from datasets import Dataset

    options: SftOptions = ctx.config
    recipe = ctx.recipe
    tokenizer = model_path.load_tokenizer(recipe.model, model_path.resolve_source(recipe.model))
    contract = training_contract(tokenizer, recipe.model)

    assistant_only = options.loss_on == "assistant"
    mixture = options.mixture()
    if mixture:
        mix = options.mix
        train = tokenize_mixture(
            recipe,
            mixture,
            tokenizer,
            options.seq_len,
            assistant_only,
            ctx.stage_dir,
            mix.strategy,
            mix.samples,
            options.seed if mix.seed is None else mix.seed,
            options.token_cache,
        )
    else:
        train = tokenize_records(
            recipe, options.dataset, tokenizer, options.seq_len, assistant_only, ctx.stage_dir, options.token_cache
        )
    train_rows, eval_rows = train.rows, None
    if options.eval_dataset:
        eval_rows = tokenize_records(
            recipe, options.eval_dataset, tokenizer, options.seq_len, assistant_only, ctx.stage_dir, options.token_cache
        ).rows
    elif options.eval_fraction:
        split = Dataset.from_list(train_rows).train_test_split(test_size=options.eval_fraction, seed=options.seed)
        train_rows, eval_rows = split["train"].to_list(), split["test"].to_list()

    callback = jsonl_callback(ctx.metrics_path, options.stage_name)
    trainer, speed_plan = build_trainer(
        recipe, options, tokenizer, train_rows, eval_rows, ctx.stage_dir, ctx.run_dir.name, [callback]
    )
    trainable, total = model_path.trainable_parameters(trainer.model)
    with speed.kernel_scope(speed_plan, trainer.model):
        result = fit(trainer, ctx.resume_from, options.eval_steps if eval_rows else None)

    outputs = save_adapter_stage(trainer, ctx.stage_dir, tokenizer, contract)

    return StageResult(
        outputs=outputs,
        summary={
            "data": train.stats,
            "chat_template": contract["chat_template_name"] or "the tokenizer's own or a file",
            **({"thinking": contract["thinking"]} if contract["thinking"] is not None else {}),
            "eval_sequences": len(eval_rows or []),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "steps": trainer.state.global_step,
            "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
            "speed": speed_plan.summary(),
            **loss_summary(trainer.state.log_history),
        },
    )


def check(options: SftOptions, recipe: Recipe) -> list[tuple[str, str]]:
    """Nothing beyond the recipe's own checks: the datasets are read by `wenmai validate`'s data check."""
    return []


def machine_problems(options: SftOptions) -> list[str]:
    """The speed options' needs are checked for every stage with a speed plan (`finetune.speed.machine_problems`)."""
    return []


def build_trainer(
    recipe: Recipe,
    options: SftOptions,
    tokenizer: Any,
    train_rows: list[dict],
    eval_rows: list[dict] | None,
    stage_dir: Path,
    run_name: str,
    callbacks: list | None = None,
    machine: speed.Machine | None = None,
    **overrides: Any,
) -> tuple[Any, speed.SpeedPlan]:
    """The stage's SFTTrainer (model, adapter, arguments) with its speed plan; `scripts/bench/sft_speed.py` builds the same.

    `machine`: a `finetune.speed.Machine` (default: this one); `overrides`: extra training arguments.
    """
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    speed_plan = speed.plan_for(options, recipe, machine, world_size=current().world_size)
    change = speed.changes(speed_plan, options, SFTConfig, recipe)
    set_seed(options.seed)  # the adapter's initial weights are random: same seed, same run
    model = model_path.load_model(recipe.model, model_path.resolve_source(recipe.model))
    if change.attention:
        varlen.use(model)
    model = model_path.attach_new_adapter(model, recipe.lora, **change.adapter)

    # padding-free without packing: rows are already cut to seq_len, and TRL refuses a max_length it would not apply
    max_length = None if speed_plan.padding_free and not options.packing else options.seq_len
    args = build_training_args(
        SFTConfig,
        options.model_copy(update=change.options),
        recipe,
        stage_dir,
        run_name,
        has_eval=eval_rows is not None,
        max_length=max_length,
        packing=options.packing,
        **{**change.trainer, **overrides},
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        callbacks=callbacks or [],
    )
    return trainer, speed_plan
