"""Stage `reward`: a reward model with one score head per dimension of the recipe's `reward` section.

Preference data -> examples (`reward.data`) -> a LoRA backbone with a head per dimension
(`reward.trainer`, TRL's RewardTrainer with the per-dimension loss) -> `reward_model/` (adapter + score
head, tokenizer, template contract, dimensions), which `reward.score.RewardScorer` loads from that folder
alone. A reward model is never merged into the policy. The options are `finetune.recipe.RewardOptions`;
`train` is separate from `run` so tests can compare the model in memory with the one reloaded from its folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune import model as model_path
from finetune import speed
from finetune.data.pairs import load_pairs, split_by_prompt
from finetune.data.template import training_contract
from finetune.distributed.ranks import current
from finetune.errors import DataError
from finetune.recipe import Recipe, RewardOptions, reward_dimensions
from finetune.run_dir import DATA_CARD_FILE, METRICS_FILE, REGISTER_FILE, StageContext, StageResult
from finetune.tracking import jsonl_callback
from finetune.training import build_training_args, fit, loss_summary
from reward.data import encode_response, slot_names, training_examples
from reward.model import RewardModelCard, choose_pad_token, save_reward_model

DEFAULT_EVAL_FRACTION = 0.1
REWARD_MODEL_DIR = "reward_model"


@dataclass
class PreparedData:
    """Tokenized train/eval rows for the trainer, and counts for the summary."""

    train_rows: list[dict]
    eval_rows: list[dict]
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainedRewardModel:
    trainer: Any
    tokenizer: Any
    card: RewardModelCard
    contract: dict
    data: PreparedData
    train_metrics: dict


def run(ctx: StageContext) -> StageResult:
    """Train the reward model, save its folder, and summarise data, agreement and held-out accuracy."""
    trained = train(ctx)
    save_reward_model(
        ctx.stage_dir / REWARD_MODEL_DIR, trained.trainer, trained.tokenizer, trained.card, trained.contract
    )
    return StageResult(
        outputs={
            "reward_model": REWARD_MODEL_DIR,
            "metrics": METRICS_FILE,
            "data_card": DATA_CARD_FILE,
            "register": REGISTER_FILE,
        },
        summary=summarise(trained),
    )


def check(options: RewardOptions, recipe: Recipe) -> list[tuple[str, str]]:
    """Nothing beyond the recipe's own checks: the datasets are read by `wenmai validate`'s data check."""
    return []


def machine_problems(options: RewardOptions) -> list[str]:
    """The speed options' needs are checked for every stage with a speed plan (`finetune.speed.machine_problems`)."""
    return []


def train(ctx: StageContext) -> TrainedRewardModel:
    """Prepare the data and train; the model stays in memory (`trainer.model`)."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardConfig

    # imports torch and TRL when loaded (it subclasses TRL's RewardTrainer): only when a reward model trains
    from reward.trainer import DimensionRewardTrainer, PreferenceCollator

    config, recipe = ctx.config, ctx.recipe
    dimensions = reward_dimensions(recipe)
    source = model_path.resolve_source(recipe.model)
    tokenizer = model_path.load_tokenizer(recipe.model, source)
    contract = training_contract(tokenizer, recipe.model)
    stop_ids = contract["stop_token_ids"]
    choose_pad_token(tokenizer, stop_ids)
    data = prepare(ctx, tokenizer)

    speed_plan = speed.plan_for(config, recipe, world_size=current().world_size)
    change = speed.changes(speed_plan, config, RewardConfig, recipe)
    set_seed(config.seed)  # the score head and the adapter start random: same seed, same run
    model = model_path.load_model(
        recipe.model,
        source,
        task="sequence-classification",
        num_labels=len(dimensions),
        pad_token_id=tokenizer.pad_token_id,
    )
    # PEFT adds `score` to modules_to_save
    model = model_path.attach_new_adapter(model, recipe.lora, task_type="SEQ_CLS", **change.adapter)
    args = build_training_args(
        RewardConfig,
        config.model_copy(update=change.options),
        recipe,
        ctx.stage_dir,
        ctx.run_dir.name,
        has_eval=bool(data.eval_rows),
        max_length=None,
        center_rewards_coefficient=config.center_rewards_coefficient,
        **change.trainer,
    )
    trainer = DimensionRewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(data.train_rows),
        eval_dataset=Dataset.from_list(data.eval_rows) if data.eval_rows else None,
        processing_class=tokenizer,
        data_collator=PreferenceCollator(pad_token_id=tokenizer.pad_token_id),
        callbacks=[jsonl_callback(ctx.metrics_path, config.stage_name)],
        slots=slot_names([d.name for d in dimensions]),
        weights=[d.weight for d in dimensions],
    )
    # transformers evaluates after the last step too, so the summary has held-out accuracy before and after
    with speed.kernel_scope(speed_plan, trainer.model):
        result = fit(trainer, ctx.resume_from)
    trainer.model.eval()
    card = RewardModelCard(
        dimensions=dimensions,
        base_model=recipe.model.model_dump(mode="json"),
        seq_len=config.seq_len,
        pad_token=tokenizer.pad_token,
        pad_token_id=tokenizer.pad_token_id,
        recipe=recipe.name,
        stage=config.stage_name,
    )
    return TrainedRewardModel(
        trainer, tokenizer, card, training_contract(tokenizer, recipe.model), data, result.metrics
    )


def prepare(ctx: StageContext, tokenizer: Any) -> PreparedData:
    """Pairs from the datasets, merged into examples, held out by prompt, and tokenized."""
    config, recipe = ctx.config, ctx.recipe
    names = [d.name for d in reward_dimensions(recipe)]
    train_set = load_pairs(recipe, config.dataset, ctx.stage_dir)
    examples = training_examples(train_set.pairs, names)
    stats: dict[str, Any] = {"train_data": train_set.stats}
    if "rater_agreement" in train_set.stats:
        stats["rater_agreement"] = train_set.stats.pop("rater_agreement")
    if config.eval_dataset:
        eval_set = load_pairs(recipe, config.eval_dataset, ctx.stage_dir)
        eval_examples = training_examples(eval_set.pairs, names)
        stats["eval_data"] = eval_set.stats
    else:
        fraction = DEFAULT_EVAL_FRACTION if config.eval_fraction is None else config.eval_fraction
        prompts = len({e["prompt_key"] for e in examples})
        eval_examples = []
        if fraction > 0 and prompts >= 2:
            examples, eval_examples = split_by_prompt(examples, fraction, config.seed)
    if not examples:
        raise DataError(
            f"dataset {config.dataset!r}: no training pairs are left after holding out the evaluation prompts"
        )
    slots = slot_names(names)
    train_rows, train_truncated = tokenize_examples(
        tokenizer, examples, config.seq_len, config.margin_scale, len(slots)
    )
    eval_rows, eval_truncated = tokenize_examples(
        tokenizer, eval_examples, config.seq_len, config.margin_scale, len(slots)
    )
    eval_rows.sort(
        key=lambda row: max(len(row["chosen_ids"]), len(row["rejected_ids"]))
    )  # batches of like lengths: less padding
    stats.update(
        train_pairs=_labelled(examples, slots),
        eval_pairs=_labelled(eval_examples, slots),
        train_examples=len(train_rows),
        eval_examples=len(eval_rows),
        truncated=train_truncated + eval_truncated,
    )
    return PreparedData(train_rows, eval_rows, stats)


def tokenize_examples(
    tokenizer: Any, examples: list[dict], seq_len: int, margin_scale: float, n_slots: int
) -> tuple[list[dict], int]:
    """Trainer rows: both responses' token ids, and for several slots the per-slot labels; (rows, truncated count)."""
    rows, truncated = [], 0
    for example in examples:
        ids_a, cut_a = encode_response(tokenizer, example["prompt"], example["a"], seq_len)
        ids_b, cut_b = encode_response(tokenizer, example["prompt"], example["b"], seq_len)
        truncated += cut_a + cut_b
        row: dict[str, Any] = {"chosen_ids": ids_a, "rejected_ids": ids_b}
        if n_slots > 1:
            row["preference"] = example["preference"]
            row["margin"] = [margin_scale * m for m in example["margin"]]
        elif margin_scale > 0:  # one slot: `a` is always the chosen response, TRL's loss takes a scalar margin
            row["margin"] = margin_scale * example["margin"][0]
        rows.append(row)
    return rows, truncated


def summarise(trained: TrainedRewardModel) -> dict[str, Any]:
    """The stage summary: data counts, rater agreement, held-out accuracy before and after, speed."""
    trainer = trained.trainer
    history = trainer.state.log_history
    evals = [
        {k.removeprefix("eval_accuracy_"): v for k, v in row.items() if k.startswith("eval_accuracy_")}
        for row in history
        if any(k.startswith("eval_accuracy_") for k in row)
    ]
    trainable, total = model_path.trainable_parameters(trainer.model)
    summary: dict[str, Any] = {"dimensions": trained.card.names, **trained.data.stats}
    if evals:
        summary.update(
            eval_accuracy=_headline(evals[-1], trained.data.stats["eval_pairs"]),
            eval_accuracy_before=evals[0],
            eval_accuracy_after=evals[-1],
        )
    summary.update(loss_summary(history, eval_loss=False))
    summary.update(
        trainable_parameters=trainable,
        total_parameters=total,
        steps=trainer.state.global_step,
        train_runtime_s=round(trained.train_metrics.get("train_runtime", 0.0), 2),
        train_examples_per_s=round(trained.train_metrics.get("train_samples_per_second", 0.0), 3),
    )
    return summary


def _labelled(examples: list[dict], slots: list[str]) -> dict[str, int]:
    counts = {slot: sum(1 for e in examples if e["preference"][i] != 0) for i, slot in enumerate(slots)}
    return {slot: n for slot, n in counts.items() if n}


def _headline(accuracy: dict[str, float], pairs: dict[str, int]) -> float:
    """One held-out figure: the total's accuracy if pairs judge the total, else all labelled pairs pooled."""
    if "total" in accuracy:
        return accuracy["total"]
    counted = {slot: pairs.get(slot, 0) for slot in accuracy}
    return round(sum(accuracy[s] * n for s, n in counted.items()) / max(1, sum(counted.values())), 4)
