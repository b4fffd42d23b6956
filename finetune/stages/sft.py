"""Stage `sft`: LoRA / QLoRA / DoRA supervised fine-tuning with TRL's SFTTrainer.

Writes `adapter/` (plain PEFT), `tokenizer/` and `template.json` (the template contract starts here).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from finetune.stages.base import StageContext, StageResult, TrainingOptions, dataset_field

SFT_FORMATS = ("chat", "instruction", "text")


class Config(TrainingOptions):
    """Supervised fine-tuning of a LoRA adapter on chat, instruction or text data (TRL SFTTrainer + PEFT)."""

    kind: ClassVar[str] = "sft"
    produces: ClassVar[tuple[str, ...]] = ("adapter", "tokenizer")
    supports_padding_free: ClassVar[bool] = True

    dataset: str = dataset_field(SFT_FORMATS, "Training dataset (a name in `data`).")
    eval_dataset: str | None = dataset_field(SFT_FORMATS, "Held-out dataset for eval loss (a name in `data`).", required=False)
    eval_fraction: float = Field(0.0, ge=0, lt=0.5, description="Hold out this share of `dataset` for eval loss instead.")
    seq_len: int = Field(1024, gt=0, description="Tokens per sequence; longer records are truncated (counted in the summary).")
    packing: bool = Field(False, description="Pack several records into each sequence (TRL best-fit packing).")
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="assistant: learn only assistant turns (and their end token); all: every token."
    )

    def check(self) -> list[tuple[str, str]]:
        if self.eval_dataset and self.eval_fraction:
            return [("eval_fraction", "set either eval_dataset or eval_fraction, not both")]
        return []


def run(ctx: StageContext) -> StageResult:
    """Train the adapter and save it, the tokenizer and the template contract into the stage folder."""
    from datasets import Dataset

    from finetune import model as model_path
    from finetune.data import tokenize_records
    from finetune.data.chat import end_of_turn_ids
    from finetune.data.template import template_contract
    from finetune.speed import kernel_scope
    from finetune.tracking import jsonl_callback
    from finetune.training import save_adapter_stage

    config: Config = ctx.config
    recipe = ctx.recipe
    tokenizer = model_path.load_tokenizer(recipe.model, model_path.resolve_source(recipe.model))
    stop_ids = end_of_turn_ids(tokenizer)

    assistant_only = config.loss_on == "assistant"
    train = tokenize_records(recipe, config.dataset, tokenizer, config.seq_len, assistant_only, ctx.stage_dir)
    train_rows, eval_rows = train.rows, None
    if config.eval_dataset:
        eval_rows = tokenize_records(recipe, config.eval_dataset, tokenizer, config.seq_len, assistant_only, ctx.stage_dir).rows
    elif config.eval_fraction:
        split = Dataset.from_list(train_rows).train_test_split(test_size=config.eval_fraction, seed=config.seed)
        train_rows, eval_rows = split["train"].to_list(), split["test"].to_list()

    callback = jsonl_callback(ctx.run_dir.metrics_path(config.stage_name), config.stage_name)
    trainer, speed_plan = build_trainer(recipe, config, tokenizer, train_rows, eval_rows, ctx.stage_dir, ctx.run_dir.name,
                                        [callback])
    trainable, total = model_path.trainable_parameters(trainer.model)
    with kernel_scope(speed_plan, trainer.model):
        result = trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
        if eval_rows and trainer.state.global_step % config.eval_steps:
            trainer.evaluate()  # the eval loss after the last step, not only at the last eval_steps boundary

    outputs = save_adapter_stage(trainer, ctx.stage_dir, tokenizer, template_contract(tokenizer, stop_ids))

    return StageResult(
        outputs=outputs,
        summary={
            "data": train.stats,
            "eval_sequences": len(eval_rows or []),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "steps": trainer.state.global_step,
            "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
            "speed": speed_plan.summary(),
            **loss_summary(trainer.state.log_history),
        },
    )


def build_trainer(recipe, config: Config, tokenizer, train_rows: list[dict], eval_rows: list[dict] | None, stage_dir,
                  run_name: str, callbacks: list | None = None, machine=None, **overrides):
    """The stage's SFTTrainer (model, adapter, arguments) with its speed plan; `scripts/bench/sft_speed.py` builds the same.

    `machine`: a `finetune.speed.Machine` (default: this one); `overrides`: extra training arguments.
    Returns (trainer, speed plan).
    """
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from finetune import model as model_path
    from finetune import speed, varlen
    from finetune.distributed.ranks import current
    from finetune.training import build_training_args

    speed_plan = speed.plan_for(config, recipe, machine, world_size=current().world_size)
    change = speed.changes(speed_plan, config, SFTConfig, recipe)
    set_seed(config.seed)  # the adapter's initial weights are random: same seed, same run
    model = model_path.load_model(recipe.model, model_path.resolve_source(recipe.model))
    if change.attention:
        varlen.use(model)
    model = model_path.attach_new_adapter(model, recipe.lora, **change.adapter)

    # padding-free without packing: rows are already cut to seq_len, and TRL refuses a max_length it would not apply
    max_length = None if speed_plan.padding_free and not config.packing else config.seq_len
    args = build_training_args(
        SFTConfig, config.model_copy(update=change.options), recipe, stage_dir, run_name, has_eval=eval_rows is not None,
        max_length=max_length, packing=config.packing, **{**change.trainer, **overrides},
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


def loss_summary(log_history: list[dict]) -> dict:
    """First and last train loss, and eval loss before and after training, from the trainer's log."""
    losses = [row["loss"] for row in log_history if "loss" in row]
    evals = [row["eval_loss"] for row in log_history if "eval_loss" in row]
    summary = {}
    if losses:
        summary.update(first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4))
    if evals:
        summary.update(eval_loss_before=round(evals[0], 4), eval_loss_after=round(evals[-1], 4))
    return summary
