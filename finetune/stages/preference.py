"""Stages `dpo`, `kto` and `orpo`: preference optimisation of the policy adapter with TRL's DPO, KTO and ORPO trainers.

The policy is the adapter of the stage named by `policy:` (default: the latest earlier stage with one, SFT
usually); it keeps training and is saved as one complete adapter (`adapter/`, SFT delta included), so
`merge` and `evaluate` read it like any other. KTO needs no pairs, only answers labelled desirable or
undesirable; they are derived from the same data (`unpaired_rows`). ORPO adds an odds-ratio term to the
SFT loss on the chosen answers and needs no reference (TRL's ORPOTrainer is in `trl.experimental`).
The options are `finetune.recipe.DpoOptions`, `KtoOptions` and `OrpoOptions`.

The reference. DPO and KTO score how far the policy has moved from a reference. With a LoRA policy there are
two cheap references: the base with the adapter switched off, or a frozen copy of the starting adapter. The
copy is the correct one: the reference must be the policy as training starts (the SFT model, π_SFT in the DPO
paper). The base without the SFT adapter scores answers as the untuned model does, so the KL term would pull
the policy back towards the base and undo SFT. The copy is also memory-light: a LoRA adapter is ~1% of the
weights, where a separate reference model (TRL's default without PEFT) doubles them. TRL's DPOTrainer and
KTOTrainer make exactly this copy (adapter "ref", frozen) when given a PeftModel that already carries an
adapter and no `ref_model`, so that is what they get; `finetune.adapters.save_policy` removes the copy before
saving. With `policy: base` the adapter is new (a zero delta), so base and copy agree and TRL uses the
adapter-disabled base. ORPO has no reference at all.
"""

from __future__ import annotations

import difflib
import importlib.util
import random
from collections import defaultdict
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from finetune.adapters import drop_fresh_reference, load_policy, save_policy
from finetune.checks.trl_choices import loss_types
from finetune.data.pairs import PreferencePair, deduplicate, hold_out, load_pairs
from finetune.data.preference import prompt_key
from finetune.errors import DataError, WenmaiError
from finetune.recipe import DpoOptions, KtoOptions, PreferenceOptions, Recipe
from finetune.run_dir import StageContext, StageResult
from finetune.tracking import jsonl_callback
from finetune.training import build_training_args, fit, loss_summary

DEFAULT_EVAL_FRACTION = 0.1


@dataclass
class PreferenceData:
    """Trainer rows (conversational, as TRL takes them) and the counts for the summary."""

    train_rows: list[dict]
    eval_rows: list[dict]
    stats: dict[str, Any] = field(default_factory=dict)


def run(ctx: StageContext) -> StageResult:
    """Train the policy adapter with TRL's trainer for the stage's kind (dpo, kto, orpo) and save it into the stage folder."""
    from datasets import Dataset

    config, recipe = ctx.config, ctx.recipe
    method = config.kind
    data = prepare(ctx, method)
    config_cls, trainer_cls = trl_classes(method)
    method_args = trainer_args(config, method, len(data.train_rows))
    policy = load_policy(
        recipe,
        ctx.run_dir,
        ctx.input_stages.get("policy"),
        ctx.inputs.get("policy"),
        config.seed,
        f"stage {config.stage_name}",
    )
    args = build_training_args(
        config_cls,
        config,
        recipe,
        ctx.stage_dir,
        ctx.run_dir.name,
        has_eval=bool(data.eval_rows),
        eval_on_start=False,  # before any step the policy is the reference: every margin is 0
        max_length=config.seq_len,
        beta=config.beta,
        **method_args,
    )
    trainer = trainer_cls(
        model=policy.model,
        args=args,
        train_dataset=Dataset.from_list(data.train_rows),
        eval_dataset=Dataset.from_list(data.eval_rows) if data.eval_rows else None,
        processing_class=policy.tokenizer,
        callbacks=[jsonl_callback(ctx.metrics_path, config.stage_name)],
    )
    drop_fresh_reference(trainer, policy)
    result = fit(trainer, ctx.resume_from, config.eval_steps if data.eval_rows else None)  # held-out margins at the end
    outputs = save_policy(trainer, ctx.stage_dir, policy)
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
        problems = machine_problems(config)
        if problems:  # liger_kernel without CUDA or liger-kernel: say so before any weights load
            raise WenmaiError("; ".join(problems))
        return {
            "loss_type": config.losses(),
            "loss_weights": config.loss_weights,
            "label_smoothing": config.label_smoothing,
            "precompute_ref_log_probs": config.precompute(train_examples, per_step),
            "precompute_ref_batch_size": config.precompute_batch_size,
            "use_liger_kernel": config.liger_kernel,
        }
    if method == "kto":
        return {
            "loss_type": config.loss_type,
            "desirable_weight": config.desirable_weight,
            "undesirable_weight": config.undesirable_weight,
            "precompute_ref_log_probs": config.precompute(train_examples, per_step),
        }
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
        raise DataError(
            f"dataset {config.dataset!r}: no training {'answers' if method == 'kto' else 'pairs'} are left "
            "after holding out the evaluation prompts"
        )
    stats.update(train_examples=len(train_rows), eval_examples=len(eval_rows))
    return PreferenceData(train_rows, eval_rows, stats)


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
        key = prompt_key(pair.prompt)
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
        raise DataError(
            f"KTO needs desirable and undesirable answers; the data gives {counts['desirable']} desirable and "
            f"{counts['undesirable']} undesirable ({mixed} mixed, left out)"
        )
    return rows, counts


# --- summary ---------------------------------------------------------------------------------


def summarise(history: list[dict], train_metrics: dict, data: PreferenceData, steps: int) -> dict[str, Any]:
    """Data counts, loss and reward margins first/last, held-out margins and accuracy, speed."""
    train = [row for row in history if "loss" in row]
    evals = [row for row in history if "eval_loss" in row]
    summary: dict[str, Any] = {**data.stats, "steps": steps}
    if train:
        summary.update(loss_summary(history, eval_loss=False))
        for key, name in (("rewards/margins", "reward_margin"), ("rewards/accuracies", "reward_accuracy")):
            logged = [row[key] for row in train if key in row]  # kto logs margins only for batches with both labels
            if logged:
                summary.update({f"{name}_first": _round(logged[0]), f"{name}_last": _round(logged[-1])})
    if evals:
        for key, name in (
            ("eval_rewards/margins", "eval_reward_margin"),
            ("eval_rewards/accuracies", "eval_reward_accuracy"),
        ):
            if key in evals[-1]:
                summary[name] = _round(evals[-1][key])
    summary.update(
        train_runtime_s=round(train_metrics.get("train_runtime", 0.0), 2),
        train_examples_per_s=round(train_metrics.get("train_samples_per_second", 0.0), 3),
    )
    return summary


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def _answer(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# --- checks ----------------------------------------------------------------------------------


def check(options: PreferenceOptions, recipe: Recipe) -> list[tuple[str, str]]:
    """Loss names the installed TRL accepts (read from TRL's source, without importing it)."""
    if not isinstance(options, DpoOptions | KtoOptions):
        return []
    known = loss_types(options.kind)
    return [
        ("loss_type", unknown_choice(name, known, f"{options.kind.upper()} loss"))
        for name in options.losses()
        if name not in known
    ]


def machine_problems(options: PreferenceOptions) -> list[str]:
    """Liger kernels need a CUDA GPU and the liger-kernel package."""
    if not isinstance(options, DpoOptions) or not options.liger_kernel:
        return []
    stage = options.stage_name
    if importlib.util.find_spec("liger_kernel") is None:
        return [
            f"stage {stage!r}: liger_kernel needs the liger-kernel package: pip install 'wenmai[gpu]' "
            "(or set liger_kernel: false)"
        ]
    import torch

    if not torch.cuda.is_available():
        return [
            f"stage {stage!r}: liger_kernel needs a CUDA GPU (its kernels are Triton); set liger_kernel: false on CPU"
        ]
    return []


def unknown_choice(name: str, known: list[str], what: str) -> str:
    """`unknown ... 'x'; did you mean y? the installed TRL accepts: ...`"""
    try:
        trl = f"TRL {version('trl')}"
    except PackageNotFoundError:
        trl = "TRL"
    guess = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"did you mean {guess[0]}? " if guess else ""
    return f"unknown {what} {name!r}; {hint}the installed {trl} accepts: {', '.join(known)}"
