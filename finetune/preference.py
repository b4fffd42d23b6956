"""The preference stages' work (dpo, kto, orpo): pairs from the data, the policy and its reference, TRL's trainer.

The reference. DPO and KTO score how far the policy has moved from a reference. With a LoRA policy there are
two cheap references: the base with the adapter switched off, or a frozen copy of the starting adapter. The
copy is the correct one: the reference must be the policy as training starts (the SFT model, π_SFT in the DPO
paper). The base without the SFT adapter scores answers as the untuned model does, so the KL term would pull
the policy back towards the base and undo SFT. The copy is also memory-light: a LoRA adapter is ~1% of the
weights, where a separate reference model (TRL's default without PEFT) doubles them. TRL's DPOTrainer and
KTOTrainer make exactly this copy (adapter "ref", frozen) when given a PeftModel that already carries an
adapter and no `ref_model`, so that is what they get; `finetune.policy.save_policy` removes the copy before
saving. With `policy: base` the adapter is new (a zero delta), so base and copy agree and TRL uses the
adapter-disabled base. ORPO has no reference at all.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from finetune.errors import DataError, WenmaiError
from finetune.stages.base import StageContext, StageResult
from reward.data import PreferencePair, load_pairs, split_by_prompt

DEFAULT_EVAL_FRACTION = 0.1


@dataclass
class PreferenceData:
    """Trainer rows (conversational, as TRL takes them) and the counts for the summary."""

    train_rows: list[dict]
    eval_rows: list[dict]
    stats: dict[str, Any] = field(default_factory=dict)


def train_and_save(ctx: StageContext, method: str) -> StageResult:
    """Train the policy adapter with TRL's `method` trainer (dpo, kto, orpo) and save it into the stage folder."""
    from datasets import Dataset

    from finetune.policy import drop_fresh_reference, load_policy, save_policy
    from finetune.tracking import jsonl_callback
    from finetune.training import build_training_args

    config, recipe = ctx.config, ctx.recipe
    data = prepare(ctx, method)
    config_cls, trainer_cls = trl_classes(method)
    method_args = trainer_args(config, method, len(data.train_rows))
    policy = load_policy(ctx)
    args = build_training_args(
        config_cls, config, recipe, ctx.stage_dir, ctx.run_dir.name, has_eval=bool(data.eval_rows),
        eval_on_start=False,  # before any step the policy is the reference: every margin is 0
        max_length=config.seq_len, beta=config.beta, **method_args,
    )
    trainer = trainer_cls(
        model=policy.model, args=args, train_dataset=Dataset.from_list(data.train_rows),
        eval_dataset=Dataset.from_list(data.eval_rows) if data.eval_rows else None,
        processing_class=policy.tokenizer,
        callbacks=[jsonl_callback(ctx.run_dir.metrics_path(config.stage_name), config.stage_name)],
    )
    drop_fresh_reference(trainer, policy)
    result = trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    if data.eval_rows and trainer.state.global_step % config.eval_steps:
        trainer.evaluate()  # held-out margins after the last step
    outputs = save_policy(trainer, ctx, policy)
    summary = summarise(trainer.state.log_history, result.metrics, data, trainer.state.global_step)
    summary["left_out_prompt_fills_seq_len"] = len(data.train_rows) - len(trainer.train_dataset)  # TRL drops those
    summary.update(used={"policy": policy.source}, **{k: v for k, v in method_args.items() if k in SUMMARY_ARGS})
    return StageResult(outputs=outputs, summary=summary)


def trl_classes(method: str) -> tuple[type, type]:
    """TRL's (config, trainer) classes for a preference method."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer
    raise ValueError(f"unknown preference method {method!r}")


SUMMARY_ARGS = ("loss_type", "precompute_ref_log_probs", "use_liger_kernel")


def trainer_args(config: Any, method: str, train_examples: int) -> dict[str, Any]:
    """The method's own TRL arguments from the stage options (the shared ones come from `build_training_args`)."""
    per_step = config.batch_size * config.gradient_accumulation
    if method == "dpo":
        losses = [config.loss_type] if isinstance(config.loss_type, str) else list(config.loss_type)
        if config.machine_problems():  # liger_kernel without CUDA or liger-kernel: say so before any weights load
            raise WenmaiError("; ".join(config.machine_problems()))
        return {"loss_type": losses, "loss_weights": config.loss_weights, "label_smoothing": config.label_smoothing,
                "precompute_ref_log_probs": config.precompute(train_examples, per_step),
                "precompute_ref_batch_size": config.precompute_batch_size, "use_liger_kernel": config.liger_kernel}
    if method == "kto":
        return {"loss_type": config.loss_type, "desirable_weight": config.desirable_weight,
                "undesirable_weight": config.undesirable_weight,
                "precompute_ref_log_probs": config.precompute(train_examples, per_step)}
    return {}


# --- data ------------------------------------------------------------------------------------

def prepare(ctx: StageContext, method: str) -> PreferenceData:
    """Pairs judged on `pairs_on`, deduplicated, held out by prompt, as TRL rows (paired, or unpaired for kto)."""
    config, recipe = ctx.config, ctx.recipe
    train_set = load_pairs(recipe, config.dataset, ctx.stage_dir, on=config.pairs_on)
    train_pairs, cleaning = deduplicate(train_set.pairs)
    stats: dict[str, Any] = {"train_data": {**train_set.stats, **cleaning}}
    stats["train_data"].pop("rater_agreement", None)  # the reward stage reports it
    if config.eval_dataset:
        eval_set = load_pairs(recipe, config.eval_dataset, ctx.stage_dir, on=config.pairs_on)
        eval_pairs, _ = deduplicate(eval_set.pairs)
        stats["eval_data"] = {k: v for k, v in eval_set.stats.items() if k != "rater_agreement"}
    else:
        fraction = DEFAULT_EVAL_FRACTION if config.eval_fraction is None else config.eval_fraction
        train_pairs, eval_pairs = hold_out(train_pairs, fraction, config.seed)
    if method == "kto":
        train_rows, train_counts = unpaired_rows(train_pairs, config.seed)
        eval_rows, _ = unpaired_rows(eval_pairs, config.seed)
        stats["train_labels"] = train_counts
    else:
        train_rows, eval_rows = paired_rows(train_pairs), paired_rows(eval_pairs)
    if not train_rows:
        raise DataError(f"dataset {config.dataset!r}: no training {'answers' if method == 'kto' else 'pairs'} are left "
                        "after holding out the evaluation prompts")
    stats.update(train_examples=len(train_rows), eval_examples=len(eval_rows))
    return PreferenceData(train_rows, eval_rows, stats)


def deduplicate(pairs: list[PreferencePair]) -> tuple[list[PreferencePair], dict[str, int]]:
    """One pair per (prompt, chosen, rejected); both orders of one pair (judged on different dimensions) cancel: dropped."""
    seen: dict[tuple, PreferencePair] = {}
    for pair in pairs:
        seen.setdefault((_prompt_key(pair), pair.chosen, pair.rejected), pair)
    contradictory = {key for key in seen if (key[0], key[2], key[1]) in seen}
    kept = [p for key, p in seen.items() if key not in contradictory]
    return kept, {"duplicate_pairs": len(pairs) - len(seen), "contradictory_pairs": len(contradictory)}


def hold_out(pairs: list[PreferencePair], fraction: float, seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Hold out `fraction` of the prompts with all their pairs (none when 0 or fewer than two prompts)."""
    examples = [{"prompt_key": _prompt_key(p), "pair": p} for p in pairs]
    if fraction <= 0 or len({e["prompt_key"] for e in examples}) < 2:
        return pairs, []
    train, held = split_by_prompt(examples, fraction, seed)
    return [e["pair"] for e in train], [e["pair"] for e in held]


def paired_rows(pairs: list[PreferencePair]) -> list[dict]:
    """DPO/ORPO rows: the prompt conversation and the two answers as assistant turns (TRL applies the chat template)."""
    return [{"prompt": p.prompt, "chosen": [_answer(p.chosen)], "rejected": [_answer(p.rejected)]} for p in pairs]


def unpaired_rows(pairs: list[PreferencePair], seed: int) -> tuple[list[dict], dict[str, int]]:
    """KTO rows from pairs: an answer that only ever wins is desirable, one that only ever loses undesirable.

    An answer that wins some comparisons and loses others (a middle tier, a mid-rated answer) has no single
    label and is left out (counted). Rows are shuffled: KTO reads them in order and estimates its KL term
    from neighbours in the batch, which should not all share a label.
    """
    wins: dict[tuple[str, str], int] = defaultdict(int)
    losses: dict[tuple[str, str], int] = defaultdict(int)
    prompts: dict[str, list[dict]] = {}
    for pair in pairs:
        key = _prompt_key(pair)
        prompts[key] = pair.prompt
        wins[(key, pair.chosen)] += 1
        losses[(key, pair.rejected)] += 1
    rows, mixed = [], 0
    for answer in dict.fromkeys([*wins, *losses]):
        won, lost = wins.get(answer, 0), losses.get(answer, 0)
        if won and lost:
            mixed += 1
            continue
        rows.append({"prompt": prompts[answer[0]], "completion": [_answer(answer[1])], "label": bool(won)})
    random.Random(seed).shuffle(rows)
    desirable = sum(r["label"] for r in rows)
    counts = {"desirable": desirable, "undesirable": len(rows) - desirable, "mixed_left_out": mixed}
    if rows and not (0 < desirable < len(rows)):
        raise DataError(f"KTO needs desirable and undesirable answers; the data gives {counts['desirable']} desirable and "
                        f"{counts['undesirable']} undesirable ({mixed} mixed, left out)")
    return rows, counts


# --- summary ---------------------------------------------------------------------------------

def summarise(history: list[dict], train_metrics: dict, data: PreferenceData, steps: int) -> dict[str, Any]:
    """Data counts, loss and reward margins first/last, held-out margins and accuracy, speed."""
    train = [row for row in history if "loss" in row]
    evals = [row for row in history if "eval_loss" in row]
    summary: dict[str, Any] = {**data.stats, "steps": steps}
    if train:
        summary.update(first_loss=_round(train[0]["loss"]), last_loss=_round(train[-1]["loss"]))
        for key, name in (("rewards/margins", "reward_margin"), ("rewards/accuracies", "reward_accuracy")):
            logged = [row[key] for row in train if key in row]  # kto logs margins only for batches with both labels
            if logged:
                summary.update({f"{name}_first": _round(logged[0]), f"{name}_last": _round(logged[-1])})
    if evals:
        for key, name in (("eval_rewards/margins", "eval_reward_margin"), ("eval_rewards/accuracies", "eval_reward_accuracy")):
            if key in evals[-1]:
                summary[name] = _round(evals[-1][key])
    summary.update(train_runtime_s=round(train_metrics.get("train_runtime", 0.0), 2),
                   train_examples_per_s=round(train_metrics.get("train_samples_per_second", 0.0), 3))
    return summary


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def _answer(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _prompt_key(pair: PreferencePair) -> str:
    return json.dumps(pair.prompt, ensure_ascii=False, sort_keys=True)
